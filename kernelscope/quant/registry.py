"""Activation quantizers by name, and the configuration that names one quantizer at one bit width.

Adding an activation quantizer is one step function in :mod:`kernelscope.quant.primitives` plus one
entry in :data:`ACTIVATION_QUANTIZERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from kernelscope.quant.primitives import (
    Activation,
    check_alpha,
    crossquant_factors,
    crossquant_step,
    per_channel_activation_step,
    per_tensor_step,
    per_token_step,
    qmax_for_bits,
)

StepFn = Callable[[Activation, int, float | None], torch.Tensor]

ACTIVATION_QUANTIZERS: dict[str, StepFn] = {
    "per_tensor": lambda x, bits, alpha: per_tensor_step(x, bits),
    "per_token": lambda x, bits, alpha: per_token_step(x, bits),
    "per_channel": lambda x, bits, alpha: per_channel_activation_step(x, bits),
    "crossquant": lambda x, bits, alpha: crossquant_step(x, bits, alpha),
}
"""name -> step function ``(x, bits, alpha) -> Δ`` broadcastable to ``x``."""

TAKES_ALPHA = frozenset({"crossquant"})

FactorFn = Callable[[Activation, float | None], tuple[torch.Tensor, torch.Tensor]]

SEPARABLE_QUANTIZERS: dict[str, tuple[Callable[[float | None], bool], FactorFn]] = {
    "crossquant": (lambda alpha: 0.0 < alpha < 1.0, crossquant_factors),
}
"""name -> (for which α the step is a full (T, I) outer product, ``(x, alpha) -> (row (..., T, 1),
col (..., 1, I))`` with Δ = separable_step(row, col, qmax)). Elsewhere the step is a broadcast vector."""

DEFAULT_ALPHA = 0.15
"""The CrossQuant paper's default exponent."""


@dataclass(frozen=True)
class QuantizerConfig:
    """One activation quantizer at one bit width (and α for CrossQuant). Validates itself."""

    quantizer: str
    bits: int
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.quantizer not in ACTIVATION_QUANTIZERS:
            known = ", ".join(ACTIVATION_QUANTIZERS)
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose from {known}")
        qmax_for_bits(self.bits)
        if self.quantizer in TAKES_ALPHA:
            if self.alpha is None:
                raise ValueError(f"quantizer {self.quantizer!r} needs alpha")
            object.__setattr__(self, "alpha", check_alpha(self.alpha))
        elif self.alpha is not None:
            raise ValueError(f"quantizer {self.quantizer!r} takes no alpha")

    @property
    def takes_alpha(self) -> bool:
        """True for quantizers with an exponent α (CrossQuant)."""
        return self.quantizer in TAKES_ALPHA

    @property
    def qmax(self) -> int:
        return qmax_for_bits(self.bits)

    @property
    def label(self) -> str:
        """Short human name, e.g. ``per_token int8`` or ``crossquant a=0.15 int4``."""
        alpha = f" a={self.alpha:g}" if self.alpha is not None else ""
        return f"{self.quantizer}{alpha} int{self.bits}"

    def step(self, x: Activation) -> torch.Tensor:
        """The step Δ this quantizer uses for activation ``x (..., T, I)``."""
        return ACTIVATION_QUANTIZERS[self.quantizer](x, self.bits, self.alpha)

    @property
    def separable(self) -> bool:
        """True when the step is a full (T, I) outer product of two vectors (CrossQuant, 0 < α < 1)."""
        entry = SEPARABLE_QUANTIZERS.get(self.quantizer)
        return entry is not None and entry[0](self.alpha)

    def factors(self, x: Activation) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(row, col)`` whose :func:`separable_step` is this quantizer's step, or None when the step
        is already a broadcastable vector (per-token, per-channel, per-tensor, CrossQuant at α = 0, 1).

        Lets statistics work from two vectors instead of a (T, I) step matrix.
        """
        return SEPARABLE_QUANTIZERS[self.quantizer][1](x, self.alpha) if self.separable else None

    def as_dict(self) -> dict:
        return {"quantizer": self.quantizer, "bits": self.bits, "alpha": self.alpha}


def activation_step(x: Activation, config: QuantizerConfig) -> torch.Tensor:
    """The step of ``config`` for ``x``; the one entry point the higher layers use."""
    return config.step(x)


def parse_quantizer_names(names: Iterable[str]) -> list[str]:
    """Validate quantizer names (case-insensitive, ``-`` accepted for ``_``), keeping order, no repeats."""
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower().replace("-", "_")
        if name not in ACTIVATION_QUANTIZERS:
            known = ", ".join(ACTIVATION_QUANTIZERS)
            raise ValueError(f"unknown quantizer {raw!r}; choose from {known}")
        if name not in out:
            out.append(name)
    return out


def expand_configs(
    quantizers: Iterable[str], bits: Iterable[int], alphas: Iterable[float]
) -> list[QuantizerConfig]:
    """Every quantizer at every bit width; α-taking quantizers once per α. Order as given."""
    bits = list(dict.fromkeys(bits))
    alphas = [check_alpha(a) for a in dict.fromkeys(alphas)]
    configs: list[QuantizerConfig] = []
    for b in bits:
        for name in parse_quantizer_names(quantizers):
            if name in TAKES_ALPHA:
                configs.extend(QuantizerConfig(name, b, a) for a in alphas)
            else:
                configs.append(QuantizerConfig(name, b))
    if not configs:
        raise ValueError("no quantizer configuration: give at least one quantizer and one bit width")
    return configs


def default_configs() -> list[QuantizerConfig]:
    """Per-token and CrossQuant (α = 0.15), each at INT8 and INT4: the profile's default set."""
    return expand_configs(["per_token", "crossquant"], [8, 4], [DEFAULT_ALPHA])
