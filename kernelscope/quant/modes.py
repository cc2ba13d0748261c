"""What an evaluation scheme does to the activations of the layers it covers, as one typed value that
every layer reads (schemes, fake quantization, exports, tables, reports) instead of comparing words."""

from __future__ import annotations

from enum import StrEnum


class Mode(StrEnum):
    """A scheme's treatment of activations; its value is what the tables' ``mode`` column holds."""

    FP = "fp"  # untouched: the reference
    FAKE_QUANT = "fake_quant"  # quantized and dequantized, as a deployed kernel computes
    REMOVE_KERNEL = "remove_kernel"  # only the kernel zeroed, every other element in full precision

    @property
    def quantizes(self) -> bool:
        """True when the scheme changes some activation (everything but fp)."""
        return self is not Mode.FP

    @property
    def removes_kernel(self) -> bool:
        return self is Mode.REMOVE_KERNEL

    @property
    def deployable(self) -> bool:
        """True when a deploying library can compute what the scheme does; removing the kernel alone is a
        diagnostic that no quantizer performs."""
        return self is Mode.FAKE_QUANT
