"""Loggers that speak, while a model loads, of what is no concern of a kernelscope user."""

QUIET_LOGGERS = ("accelerate", "torchao", "torch.utils._pytree")
"""accelerate's "offloaded to the disk" (what was asked for); torchao's missing CUDA kernels and the
deprecation notes it triggers in torch, when transformers or accelerate import it."""
