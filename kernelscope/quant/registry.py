"""The configuration that names one quantizer (a format of :data:`~kernelscope.quant.formats.FORMATS`)
at one bit width (and α for CrossQuant, a block size for a block format).

The vocabulary is the formats registry: a new format there is a new ``-q`` choice, scheme, weight
format, statistic row and report entry everywhere, with nothing else to change. What a statistic
needs of a quantizer (its scale rule, element grid, zero threshold τ, block size) it reads from
:attr:`QuantizerConfig.format`, never from its name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import torch

from kernelscope.quant import formats
from kernelscope.quant.primitives import Activation, check_alpha, crossquant_factors, qmax_for_bits

DEFAULT_ALPHA = 0.15
"""The CrossQuant paper's default exponent."""


@dataclass(frozen=True)
class QuantizerConfig:
    """One activation quantizer at one bit width (and α for CrossQuant, the block size for a block
    format). ``quantizer`` is a name of the formats registry; a float format's ``bits`` is its element
    width. Validates itself."""

    quantizer: str
    bits: int
    alpha: float | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        entry = formats.FORMATS.get(self.quantizer)
        if entry is None:
            known = ", ".join(formats.FORMATS)
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose from {known}")
        if entry.grid is None:
            qmax_for_bits(self.bits)
        elif self.bits != entry.grid.bits:
            raise ValueError(f"quantizer {self.quantizer!r} has {entry.grid.bits}-bit elements, "
                             f"got {self.bits}")
        if entry.takes_alpha:
            if self.alpha is None:
                raise ValueError(f"quantizer {self.quantizer!r} needs alpha")
            object.__setattr__(self, "alpha", check_alpha(self.alpha))
        elif self.alpha is not None:
            raise ValueError(f"quantizer {self.quantizer!r} takes no alpha")
        if self.block_size is None and entry.block_size is not None:
            object.__setattr__(self, "block_size", entry.block_size)
        self.format  # noqa: B018 - a block size where there are no blocks, or a bad one, fails here

    @cached_property
    def format(self) -> formats.Format:
        """The number format: scale rule, element grid, τ, block size."""
        return formats.get_format(self.quantizer, bits=self.bits, block_size=self.block_size,
                                  alpha=self.alpha)

    @property
    def saturation_scale(self) -> float:
        """The λ at which ``|x / s| <= λ·τ`` holds for every element a scale covers: the grid's largest
        value over τ (2·qmax for INT)."""
        grid = self.format.grid
        return grid.max_value / grid.tau

    @property
    def takes_alpha(self) -> bool:
        """True for quantizers with an exponent α (CrossQuant)."""
        return formats.FORMATS[self.quantizer].takes_alpha

    @property
    def qmax(self) -> int:
        return qmax_for_bits(self.bits)

    @property
    def label(self) -> str:
        """Short human name: ``per_token int8``, ``crossquant a=0.15 int4``, ``per_group g128 int4``,
        ``mxfp4``."""
        if not self.format.grid.is_int:
            return self.quantizer
        alpha = f" a={self.alpha:g}" if self.alpha is not None else ""
        group = f" g{self.block_size}" if self.block_size is not None else ""
        return f"{self.quantizer}{alpha}{group} {self.format.grid.name}"

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The scale (the step Δ of an INT quantizer) this quantizer uses for ``x (..., T, I)``."""
        return formats.scale(x, self.format)

    @property
    def separable(self) -> bool:
        """True when the step is a full (T, I) outer product of two vectors (CrossQuant, 0 < α < 1);
        at α = 0 and 1 it is exactly per-channel and per-token."""
        return self.format.rule.unit is formats.Unit.CROSSQUANT and 0.0 < self.alpha < 1.0

    def factors(self, x: Activation) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row (..., T, 1), col (..., 1, I))`` whose ``separable_step`` is this quantizer's step
        (:attr:`separable` quantizers only): statistics work from the two vectors instead of a (T, I)
        step matrix."""
        if not self.separable:
            raise ValueError(f"{self.label} has no separable step")
        return crossquant_factors(x, self.alpha)

    def as_dict(self) -> dict:
        return {"quantizer": self.quantizer, "bits": self.bits, "alpha": self.alpha,
                "format": self.format.grid.name, "block_size": self.block_size}


def parse_quantizer_names(names: Iterable[str]) -> list[str]:
    """Validate quantizer names (case-insensitive, ``-`` accepted for ``_``), keeping order, no repeats."""
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower().replace("-", "_")
        if name not in formats.FORMATS:
            raise ValueError(f"unknown quantizer {raw!r}; choose from {', '.join(formats.FORMATS)}")
        if name not in out:
            out.append(name)
    return out


def expand_configs(
    quantizers: Iterable[str], bits: Iterable[int], alphas: Iterable[float], group_size: int | None = None
) -> list[QuantizerConfig]:
    """Every INT quantizer at every bit width (α-taking ones once per α, block ones with ``group_size``
    channels a block); every float format once, at its own width. Order as given."""
    bits = list(dict.fromkeys(bits))
    alphas = [check_alpha(a) for a in dict.fromkeys(alphas)]
    names = parse_quantizer_names(quantizers)
    configs: list[QuantizerConfig] = []
    for b in bits:
        for name in names:
            entry = formats.FORMATS[name]
            if entry.grid is not None:  # a float format: once, at its own width (below)
                continue
            block = group_size if entry.block_size is not None else None
            each_alpha = alphas if entry.takes_alpha else [None]
            configs.extend(QuantizerConfig(name, b, a, block) for a in each_alpha)
    configs += [QuantizerConfig(n, formats.FORMATS[n].grid.bits) for n in names if formats.FORMATS[n].grid]
    if not configs:
        raise ValueError("no quantizer configuration: give at least one quantizer and one bit width")
    return configs


def default_configs() -> list[QuantizerConfig]:
    """Per-token and CrossQuant (α = 0.15), each at INT8 and INT4: the profile's default set."""
    return expand_configs(["per_token", "crossquant"], [8, 4], [DEFAULT_ALPHA])
