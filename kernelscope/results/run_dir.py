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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from kernelscope.errors import KernelscopeError
from kernelscope.results.paths import (
    EXPORT_NAMES,
    LEGACY_SUMMARIES,
    RUN_MARKER,
    SUMMARY,
    check_output_dir,
    file_digest,
    summary_of,
)
from kernelscope.results.schema import SCHEMA_VERSION, conformed, parquet_metadata


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(value: Any, **layout: Any) -> str:
    """``value`` as strict JSON, the one spelling of every JSON kernelscope prints or writes: a non-finite
    number is null (a strict parser knows no NaN), anything else not JSON by nature is its text."""
    return json.dumps(json_safe(value), allow_nan=False, ensure_ascii=False, default=str, **layout)


def default_mode(path: Path, *, directory: bool) -> None:
    """Give a file or folder made through ``tempfile`` (owner-only) the permissions of an ordinary one."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


class Staged(Protocol):
    """Output written in full beside its final place: ``commit`` puts it there, ``discard`` removes it."""

    def commit(self) -> None: ...

    def discard(self) -> None: ...


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; those made, outermost first (for :func:`remove_made`)."""
    missing = [p for p in path.parents if not p.exists()][::-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def remove_made(folders: list[Path]) -> None:
    """Remove the folders :func:`make_parents` made, innermost first, where they are still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


@dataclass
class StagedRun:
    """A complete run folder in a hidden sibling of its final place, and the folders made above it."""

    folder: Path
    final: Path
    made: list[Path]

    def commit(self) -> None:
        if self.final.exists():
            _swap(self.folder, self.final)
        else:
            os.replace(self.folder, self.final)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        remove_made(self.made)


def write_run(path: str | Path, tables: dict[str, pl.DataFrame], summary: dict[str, Any],
              *, overwrite: bool = False, files: dict[str, str] | None = None, option: str = "--output",
              alongside: Callable[[Path], Staged | None] | None = None) -> Path:
    """Write ``tables`` as ``<name>.parquet``, ``summary`` as ``summary.json`` and ``files`` (name ->
    text, names of :data:`EXPORT_NAMES`) beside them, all or nothing.

    ``alongside`` stages other output from the complete folder (a report of it) before anything is put
    in place; it is committed right after the folder, or discarded with it (or, returning None, it wrote
    into the folder itself). A place that cannot be written is one error naming ``option``, with nothing
    left behind.
    """
    out = check_output_dir(path, overwrite, option)
    staged, extra = None, None
    try:
        staged = _stage_run(out, tables, summary, files or {})
        extra = alongside(staged.folder) if alongside is not None else None
        staged.commit()
    except BaseException as exc:
        for part in (staged, extra):
            if part is not None:
                part.discard()
        if isinstance(exc, OSError):
            raise KernelscopeError(f"{option} {path} cannot be written ({exc.strerror or exc}); "
                                   "nothing was written") from None
        raise
    if extra is not None:
        extra.commit()
    return out


def _stage_run(out: Path, tables: dict[str, pl.DataFrame], summary: dict[str, Any],
               files: dict[str, str]) -> StagedRun:
    """The run folder written in full into a hidden sibling of ``out``, its marker listing every file."""
    if not set(files) <= set(EXPORT_NAMES):
        raise ValueError(f"a run folder's other files are {EXPORT_NAMES}, got {sorted(files)}")
    made = make_parents(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError:
        remove_made(made)
        raise
    staged = StagedRun(tmp, out, made)
    try:
        default_mode(tmp, directory=True)
        for name, frame in tables.items():
            conformed(frame).write_parquet(tmp / f"{name}.parquet",
                                           metadata=parquet_metadata(name, summary.get("kind")))
        (tmp / SUMMARY).write_text(to_json({"schema_version": SCHEMA_VERSION, **summary}, indent=2) + "\n",
                                   encoding="utf-8")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        listed = {p.name: file_digest(p) for p in sorted(tmp.iterdir())}
        marker = {"schema_version": SCHEMA_VERSION, "summary": SUMMARY, "files": listed}
        (tmp / RUN_MARKER).write_text(to_json(marker) + "\n", encoding="utf-8")
    except BaseException:
        staged.discard()
        raise
    return staged


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
