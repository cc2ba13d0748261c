"""Forward hooks on modules (any hook, or the inputs of Linear layers), attached for the length of a
``with`` block only; the one place the package attaches hooks."""

from kernelscope.capture.hooks import ForwardHooks, LinearInputCapture, is_linear, linear_in_features

__all__ = ["ForwardHooks", "LinearInputCapture", "is_linear", "linear_in_features"]
