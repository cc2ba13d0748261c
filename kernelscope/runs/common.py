"""What every run summary says about the run: the model, the text, the windows, versions, date."""

from __future__ import annotations

import datetime as dt
import platform
from typing import Any

import polars as pl
import torch
from torch import nn

from kernelscope.data import TextSource, Windows
from kernelscope.models import LoadedModel


def versions() -> dict[str, str]:
    """Versions of what produced a result."""
    import transformers

    from kernelscope import __version__

    return {
        "kernelscope": __version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "polars": pl.__version__,
        "python": platform.python_version(),
    }


def unpack(model: nn.Module | LoadedModel) -> tuple[nn.Module, dict[str, Any], Any]:
    """The module, facts about it, and its tokenizer (None for a bare module)."""
    if isinstance(model, LoadedModel):
        return model.model, dict(model.info), model.tokenizer
    return model, {"architecture": type(model).__name__}, None


def text_facts(text: TextSource | None) -> dict[str, Any] | None:
    if text is None:
        return None
    return {"source": text.name, "description": text.description, "sha256": text.sha256,
            "characters": len(text.text)}


def run_context(model_info: dict, text: TextSource | None, windows: Windows, kind: str) -> dict[str, Any]:
    """The part of every run summary that says what was measured on what."""
    return {
        "kind": kind,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": model_info,
        "text": text_facts(text),
        "windows": windows.as_dict(),
        "versions": versions(),
    }
