"""Mergeable streaming accumulators: ``measure`` one batch while it exists, ``summarise`` it,
``update``, ``merge``, read ``result``.

Memory per layer is O(channels + histogram bins + top-k), never O(tokens).

The per-element passes over an activation (C on CPU, torch elsewhere) are
:mod:`kernelscope.element`'s; this package reduces what they read.

==================  ===========================================================================
module              its one job
==================  ===========================================================================
``measure``         what the hooks read off each Linear input while it exists
``summary``         everything else, from t and c, for the inputs of one shape at once
``observation``     the reduced state and how two states add up
``accumulator``     per-layer accumulators and their stacked groups
``table``           the accumulated state as result rows
==================  ===========================================================================
"""

from kernelscope.stats.accumulator import KernelStats
from kernelscope.stats.histogram import HISTOGRAM, LogHistogram
from kernelscope.stats.observation import Observation
from kernelscope.stats.summary import observe

__all__ = ["HISTOGRAM", "KernelStats", "LogHistogram", "Observation", "observe"]
