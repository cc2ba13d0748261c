"""Pure tensor maths of quantization: number formats, scales, fake quantization, kernels, zero bounds.

Nothing here touches an ``nn.Module`` or a file; every function is out-of-place. The formats
themselves (scale rules, element grids, zero thresholds) are :mod:`kernelscope.quant.formats`.
"""

from kernelscope.quant.modes import Mode
from kernelscope.quant.primitives import (
    MAX_BITS,
    MIN_BITS,
    STEP_FLOOR,
    Activation,
    ActivationRanges,
    absmax_scale,
    activation_ranges,
    as_sequences,
    channel_absmax,
    check_alpha,
    crossquant_factors,
    crossquant_step,
    per_channel_activation_step,
    per_tensor_step,
    per_token_step,
    qmax_for_bits,
    separable_step,
    smoothing_factors,
    token_absmax,
)
from kernelscope.quant.registry import (
    DEFAULT_ALPHA,
    QuantizerConfig,
    default_configs,
    expand_configs,
    parse_quantizer_names,
)

__all__ = [
    "DEFAULT_ALPHA",
    "MAX_BITS",
    "MIN_BITS",
    "STEP_FLOOR",
    "Activation",
    "ActivationRanges",
    "Mode",
    "QuantizerConfig",
    "absmax_scale",
    "activation_ranges",
    "as_sequences",
    "channel_absmax",
    "check_alpha",
    "crossquant_factors",
    "crossquant_step",
    "default_configs",
    "expand_configs",
    "parse_quantizer_names",
    "per_channel_activation_step",
    "per_tensor_step",
    "per_token_step",
    "qmax_for_bits",
    "separable_step",
    "smoothing_factors",
    "token_absmax",
]
