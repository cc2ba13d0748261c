"""kernelscope: measure the quantization kernel of a language model — the activation elements a
quantizer rounds to zero — layer by layer, per-token against CrossQuant.

Typical use::

    import kernelscope as ks
    loaded = ks.load_model("demo")
    text = ks.load_text("pydoc")
    windows = ks.make_windows(ks.tokenize(loaded.tokenizer, text.text), seqlen=512, nsamples=4)
    result = ks.profile(loaded, windows, ks.default_configs(), text=text)
    result.layers        # polars DataFrame, one row per layer x quantizer configuration

Names are imported on first use, so that ``import kernelscope`` (and the CLI's ``--help``) stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kernelscope.version import __version__

_LAZY = {
    "Windows": "kernelscope.data",
    "load_text": "kernelscope.data",
    "load_tasks": "kernelscope.data",
    "make_windows": "kernelscope.data",
    "tokenize": "kernelscope.data",
    "KernelscopeError": "kernelscope.errors",
    "load_model": "kernelscope.models",
    "select_linear_layers": "kernelscope.models",
    "DEFAULT_ALPHA": "kernelscope.quant",
    "QuantizerConfig": "kernelscope.quant",
    "expand_configs": "kernelscope.quant",
    "default_configs": "kernelscope.quant",
    "read_run": "kernelscope.results",
    "ProfileResult": "kernelscope.runs",
    "profile": "kernelscope.runs",
    "evaluate": "kernelscope.runs",
    "parse_scheme": "kernelscope.runs",
    "threshold_search": "kernelscope.runs",
    "alpha_sweep": "kernelscope.runs",
    "zeroshot": "kernelscope.runs",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # names for type checkers; at run time they load lazily
    from kernelscope.data import Windows, load_tasks, load_text, make_windows, tokenize
    from kernelscope.errors import KernelscopeError
    from kernelscope.models import load_model, select_linear_layers
    from kernelscope.quant import DEFAULT_ALPHA, QuantizerConfig, default_configs, expand_configs
    from kernelscope.results import read_run
    from kernelscope.runs import (
        ProfileResult,
        alpha_sweep,
        evaluate,
        parse_scheme,
        profile,
        threshold_search,
        zeroshot,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kernelscope' has no attribute {name!r}")
