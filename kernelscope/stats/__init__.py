"""Mergeable streaming accumulators: ``observe`` one batch, ``update``, ``merge``, read ``result``.

Memory per layer is O(channels + histogram bins + top-k), never O(tokens).
"""

from kernelscope.stats.histogram import LogHistogram
from kernelscope.stats.kernel import KernelStats, Observation, observe

__all__ = ["KernelStats", "LogHistogram", "Observation", "observe"]
