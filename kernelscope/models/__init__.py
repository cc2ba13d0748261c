"""Loading causal LMs and their tokenizers (hub id, local folder, .gguf, the demo), and choosing layers."""

from kernelscope.models.layers import LinearLayer, find_decoder_blocks, select_linear_layers
from kernelscope.models.loading import (
    DEMO_GGUF,
    DEMO_PACKAGE,
    LoadedModel,
    ModelSource,
    load_model,
    parse_device,
    parse_dtype,
    resolve_model_source,
)

__all__ = [
    "DEMO_GGUF",
    "DEMO_PACKAGE",
    "LinearLayer",
    "LoadedModel",
    "ModelSource",
    "find_decoder_blocks",
    "load_model",
    "parse_device",
    "parse_dtype",
    "resolve_model_source",
    "select_linear_layers",
]
