"""Evaluation schemes by name: ``fp``, ``w8a8-crossquant``, ``w4a8-g128-per-token``,
``w8a8-smoothquant``, ``remove-kernel-per-token``, ...

A scheme says how every decoder Linear's activation and weight are treated during a forward pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kernelscope.errors import KernelscopeError
from kernelscope.quant import DEFAULT_ALPHA, QuantizerConfig, check_alpha, qmax_for_bits

QUANTIZER_WORDS = {"per-token": "per_token", "per-tensor": "per_tensor", "per-channel": "per_channel",
                   "crossquant": "crossquant"}
_FAKE = re.compile(r"^w(\d+)a(\d+)(?:-g(\d+))?-(per-token|per-tensor|per-channel|crossquant|smoothquant)$")
_REMOVE = re.compile(r"^remove-kernel-(per-token|per-tensor|per-channel|crossquant)$")

EXAMPLES = ("fp", "w8a8-per-token", "w8a8-crossquant", "w4a8-g128-per-token", "w4a8-g128-crossquant",
            "w4a4-per-token", "w4a4-crossquant", "w8a8-smoothquant", "remove-kernel-per-token",
            "remove-kernel-crossquant")
SMOOTHQUANT_ALPHA = 0.5


@dataclass(frozen=True)
class Scheme:
    """How activations and weights of the covered Linear layers are treated.

    ``mode``: ``fp`` (untouched), ``fake_quant`` (activations quantized and dequantized) or
    ``remove_kernel`` (only the kernel of ``activation`` zeroed, at ``kernel_scale`` = λ times its
    zero bound). ``weight_bits`` None keeps weights in full precision; ``group_size`` None is
    per-output-channel. ``smooth_alpha`` set means SmoothQuant scaling before quantization.
    """

    name: str
    mode: str
    activation: QuantizerConfig | None = None
    weight_bits: int | None = None
    group_size: int | None = None
    smooth_alpha: float | None = None
    kernel_scale: float = 1.0

    @property
    def touches_model(self) -> bool:
        return self.mode != "fp" or self.weight_bits is not None

    def describe(self) -> dict:
        act = self.activation
        return {
            "scheme": self.name, "mode": self.mode,
            "activation_quantizer": act.quantizer if act else None,
            "activation_bits": act.bits if act else None,
            "alpha": act.alpha if act else None,
            "weight_bits": self.weight_bits, "group_size": self.group_size,
            "smooth_alpha": self.smooth_alpha,
            "kernel_scale": self.kernel_scale if self.mode == "remove_kernel" else None,
        }


def parse_scheme(
    text: str,
    *,
    alpha: float = DEFAULT_ALPHA,
    bits: int = 8,
    weight_bits: int | None = None,
    group_size: int | None = None,
    smooth_alpha: float = SMOOTHQUANT_ALPHA,
) -> Scheme:
    """Parse a scheme name. ``alpha`` is CrossQuant's exponent; ``bits``, ``weight_bits`` and
    ``group_size`` apply to ``remove-kernel-*`` (whose name carries no bit widths)."""
    name = text.strip().lower()
    try:
        if name == "fp":
            return Scheme("fp", "fp")
        if m := _FAKE.match(name):
            wbits, abits, group, kind = int(m[1]), int(m[2]), m[3], m[4]
            qmax_for_bits(wbits)
            if group is not None and int(group) < 1:
                raise ValueError("the group size gG must be at least 1")
            if kind == "smoothquant":
                act = QuantizerConfig("per_token", abits)
                return Scheme(name, "fake_quant", act, wbits, int(group) if group else None,
                              smooth_alpha=check_alpha(smooth_alpha))
            quantizer = QUANTIZER_WORDS[kind]
            act = QuantizerConfig(quantizer, abits, alpha if quantizer == "crossquant" else None)
            return Scheme(name, "fake_quant", act, wbits, int(group) if group else None)
        if m := _REMOVE.match(name):
            quantizer = QUANTIZER_WORDS[m[1]]
            act = QuantizerConfig(quantizer, bits, alpha if quantizer == "crossquant" else None)
            if weight_bits is not None:
                qmax_for_bits(weight_bits)
            return Scheme(name, "remove_kernel", act, weight_bits, group_size)
    except ValueError as exc:
        raise KernelscopeError(f"scheme {text!r}: {exc}") from None
    raise KernelscopeError(
        f"unknown scheme {text!r}; use fp, wXaY[-gG]-QUANTIZER (QUANTIZER: per-token, crossquant, "
        "per-tensor, per-channel, smoothquant) or remove-kernel-QUANTIZER, e.g. " + ", ".join(EXAMPLES[1:4])
    )
