"""A run folder holds ``summary.json`` (whatever the run's kind) plus one parquet file per table
(``layers.parquet``, ``eval.parquet``, ...).

Writes go to a hidden sibling folder first and are renamed into place, so a failed or interrupted
run never leaves a half-written result behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from kernelscope.errors import KernelscopeError
from kernelscope.results.paths import EXPORT_NAMES, LEGACY_SUMMARIES, RUN_MARKER, SUMMARY, check_output_dir, summary_of
from kernelscope.results.schema import SCHEMA_VERSION, parquet_metadata, typed


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def default_mode(path: Path, *, directory: bool) -> None:
    """Give a file or folder made through ``tempfile`` (owner-only) the permissions of an ordinary one."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def write_run(path: str | Path, tables: dict[str, pl.DataFrame], summary: dict[str, Any],
              *, overwrite: bool = False, files: dict[str, str] | None = None) -> Path:
    """Write ``tables`` as ``<name>.parquet``, ``summary`` as ``summary.json`` and ``files`` (name ->
    text, names of :data:`EXPORT_NAMES`) beside them, all or nothing."""
    files = files or {}
    if not set(files) <= set(EXPORT_NAMES):
        raise ValueError(f"a run folder's other files are {EXPORT_NAMES}, got {sorted(files)}")
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    default_mode(tmp, directory=True)
    try:
        for name, frame in tables.items():
            typed(frame).write_parquet(tmp / f"{name}.parquet", metadata=parquet_metadata(name, summary.get("kind")))
        body = {"schema_version": SCHEMA_VERSION, **summary}
        (tmp / SUMMARY).write_text(json.dumps(json_safe(body), indent=2, ensure_ascii=False) + "\n")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        marker = {"schema_version": SCHEMA_VERSION, "summary": SUMMARY}
        (tmp / RUN_MARKER).write_text(json.dumps(marker) + "\n")
        if out.exists():
            _swap(tmp, out)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap(new: Path, out: Path) -> None:
    """Put ``new`` in the place of the run folder ``out``; if the old one cannot move, it stays."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    try:
        os.replace(out, old / "run")
    except OSError as exc:
        shutil.rmtree(old, ignore_errors=True)
        raise KernelscopeError(f"cannot replace {out}: {exc.strerror or exc}; nothing was written") from None
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class RunFolder:
    """A run read back: its summary and its tables."""

    path: Path
    summary: dict[str, Any]
    tables: dict[str, pl.DataFrame]


def read_run(path: str | Path) -> RunFolder:
    """Read a run folder, refusing what is not one, is damaged, or was written by a newer version."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise KernelscopeError(f"{path} is not a folder")
    summary_file = summary_of(folder)
    if summary_file is None:
        raise KernelscopeError(f"{path} is not a kernelscope run folder (no {SUMMARY}, nor an older folder's "
                               f"{' / '.join(LEGACY_SUMMARIES)})")
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KernelscopeError(f"{summary_file} is damaged (not valid JSON)") from None
    if not isinstance(summary, dict):
        raise KernelscopeError(f"{summary_file} is damaged (not a JSON object)")
    version = summary.get("schema_version")
    if not isinstance(version, int):
        raise KernelscopeError(f"{summary_file} has no schema_version; is it a kernelscope run?")
    if version > SCHEMA_VERSION:
        raise KernelscopeError(
            f"{path} was written with schema version {version}, newer than this kernelscope reads "
            f"({SCHEMA_VERSION}); upgrade kernelscope"
        )
    tables = {}
    for file in sorted(folder.glob("*.parquet")):
        try:
            tables[file.stem] = pl.read_parquet(file)
        except Exception:
            raise KernelscopeError(f"{file} is damaged (not a readable parquet file)") from None
    return RunFolder(folder, summary, tables)
