"""Pure tensor maths of symmetric absmax quantization: steps, fake quantization, kernels, zero bounds.

Nothing here touches an ``nn.Module`` or a file; every function is out-of-place.
"""

from kernelscope.quant.primitives import (
    STEP_FLOOR,
    Activation,
    ActivationRanges,
    activation_ranges,
    channel_absmax,
    check_alpha,
    crossquant_step,
    dequantize,
    fake_quantize,
    groupwise_weight_step,
    kernel_mask,
    per_channel_activation_step,
    per_channel_weight_step,
    per_tensor_step,
    per_token_step,
    qmax_for_bits,
    quantize,
    token_absmax,
    zero_bound,
)
from kernelscope.quant.registry import (
    ACTIVATION_QUANTIZERS,
    QuantizerConfig,
    DEFAULT_ALPHA,
    activation_step,
    default_configs,
    expand_configs,
    parse_quantizer_names,
)

__all__ = [
    "ACTIVATION_QUANTIZERS",
    "DEFAULT_ALPHA",
    "default_configs",
    "expand_configs",
    "check_alpha",
    "STEP_FLOOR",
    "Activation",
    "ActivationRanges",
    "activation_ranges",
    "QuantizerConfig",
    "activation_step",
    "channel_absmax",
    "crossquant_step",
    "dequantize",
    "fake_quantize",
    "groupwise_weight_step",
    "kernel_mask",
    "parse_quantizer_names",
    "per_channel_activation_step",
    "per_channel_weight_step",
    "per_tensor_step",
    "per_token_step",
    "qmax_for_bits",
    "quantize",
    "token_absmax",
    "zero_bound",
]
