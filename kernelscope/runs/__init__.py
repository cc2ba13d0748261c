"""Experiments composed from the lower layers. They return results and never print."""

from kernelscope.runs.evaluate import EvalResult, evaluate
from kernelscope.runs.profiling import ProfileResult, profile
from kernelscope.runs.schemes import Scheme, parse_scheme
from kernelscope.runs.sweep import SweepResult, alpha_sweep
from kernelscope.runs.threshold import ThresholdResult, threshold_search
from kernelscope.runs.zeroshot import ZeroshotResult, zeroshot

__all__ = [
    "EvalResult", "ProfileResult", "Scheme", "SweepResult", "ThresholdResult", "ZeroshotResult",
    "alpha_sweep", "evaluate", "parse_scheme", "profile", "threshold_search", "zeroshot",
]
