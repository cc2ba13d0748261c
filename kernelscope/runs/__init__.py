"""Experiments composed from the lower layers. They return results and never print."""

from kernelscope.runs.profiling import ProfileResult, profile

__all__ = ["ProfileResult", "profile"]
