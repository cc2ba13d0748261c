"""What every run summary says about the run: the model, the text, the windows, versions, date."""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import torch
from torch import nn

from kernelscope.data import TextSource, Windows
from kernelscope.models import LinearLayer, LoadedModel, select_linear_layers
from kernelscope.results import write_run

StageProgress = Callable[[str, int, int], None]
"""``progress(stage, windows_done, windows_total)``; the stage names the pass (``fp``, ``α=0.15``, ...)."""


def versions() -> dict[str, str]:
    """Versions of what produced a result."""
    import transformers

    from kernelscope.version import __version__

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


def run_context(model_info: dict, text: TextSource | None, windows: Windows | None,
                kind: str) -> dict[str, Any]:
    """The part of every run summary that says what was measured on what (``windows`` None for a run
    that reads task documents rather than windows of a text)."""
    return {
        "kind": kind,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": model_info,
        "text": text_facts(text),
        "windows": windows.as_dict() if windows is not None else None,
        "versions": versions(),
    }


def resolve_layers(model: nn.Module, layers: str | Sequence[LinearLayer] | None,
                   include_lm_head: bool = False) -> list[LinearLayer]:
    """A regular expression, an explicit list, or None (every Linear in the decoder blocks)."""
    if layers is not None and not isinstance(layers, str):
        return list(layers)
    return select_linear_layers(model, layers, include_lm_head=include_lm_head)


def stage_callback(progress: StageProgress | None, stage: str) -> Callable[[int, int], None] | None:
    """The per-window progress callback of one named pass."""
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


@dataclass
class TableResult:
    """A run's table and its JSON summary; ``save`` writes ``<TABLE>.parquet`` and ``summary.json``."""

    table: pl.DataFrame
    summary: dict[str, Any]
    TABLE: ClassVar[str] = ""

    def save(self, path: str | Path, *, overwrite: bool = False, **writing: Any) -> Path:
        """Write the run folder atomically (all or nothing)."""
        return write_run(path, {self.TABLE: self.table}, self.summary, overwrite=overwrite, **writing)
