"""Hooks on the inputs of Linear layers, attached for the length of a ``with`` block only."""

from kernelscope.capture.hooks import LinearInputCapture, is_linear, linear_in_features

__all__ = ["LinearInputCapture", "is_linear", "linear_in_features"]
