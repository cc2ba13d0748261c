"""Which output paths kernelscope may write or replace: never one it did not write itself.

A run folder carries a marker file (:data:`RUN_MARKER`) that lists every file the run wrote with the
SHA-256 of its bytes; a report carries a generator tag in its first bytes (:data:`REPORT_TAG`). A file is
kernelscope's by what it holds, never by its name or extension: listed in the marker with the same bytes,
or a report. Folders written before the marker listed its files are read by content too: a summary with a
schema version, a parquet table whose metadata names a kernelscope table. ``--overwrite`` replaces only a
folder of such files, and never the working folder, one of its parents, the home folder or the filesystem
root. Every check here runs before any work starts, and proves the place writable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from kernelscope.errors import KernelscopeError

NAME_MAX = 255
"""The longest file or folder name, in bytes, that common file systems allow."""
RUN_MARKER = ".kernelscope-run"
"""The file every run folder holds; its presence is what makes a folder replaceable."""
REPORT_TAG = '<meta name="generator" content="kernelscope">'
"""The tag at the head of every report; only a file that starts with it is replaced."""
SUMMARY = "summary.json"
"""Every run folder's summary, whatever the run (its ``kind`` says which: profile, eval, threshold, ...)."""
LEGACY_SUMMARIES = ("eval.json", "threshold.json", "sweep.json", "zeroshot.json", "advice.json",
                    "sensitivity.json")
"""Where folders of schema version 2 and before kept the summary of runs other than profiles; still read."""
SUMMARY_NAMES = (SUMMARY, *LEGACY_SUMMARIES)
LEGACY_ADVICE = "advice.json"
EXPORT_NAMES = ("recipe.yaml", "modelopt_quant_cfg.yaml", "modules.txt")
"""The files an advice folder holds for the deploying tools (see :mod:`kernelscope.results.exports`)."""
LEGACY_EXPORT_NAMES = ("modelopt_quant_cfg.json",)
"""Exports older advice folders hold: the ModelOpt entries before they became a full YAML config."""


def protected_paths() -> set[Path]:
    """Paths that are never replaced: the working folder and its parents, the home folder, the root."""
    cwd = Path.cwd().resolve()
    return {cwd, *cwd.parents, Path.home().resolve(), Path(cwd.anchor)}


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, as the marker lists it."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def marked_files(folder: Path) -> dict[str, str] | None:
    """The files the marker of ``folder`` lists (name -> SHA-256), or None where the marker lists none
    (a folder written before markers listed their files, or no marker at all)."""
    try:
        files = json.loads((folder / RUN_MARKER).read_text(encoding="utf-8")).get("files")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def is_kernelscope_table(file: Path) -> bool:
    """True when ``file`` is a parquet table whose metadata names a kernelscope table, or (written before
    tables carried that metadata) whose every column is one of the results schema's."""
    import polars as pl

    from kernelscope.results.schema import COLUMNS

    try:
        if "kernelscope.table" in pl.read_parquet_metadata(file):
            return True
        return set(pl.read_parquet_schema(file)) <= set(COLUMNS)
    except Exception:  # any unreadable or foreign file is simply not ours
        return False


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` kernelscope did not write, judged by content: a file the marker lists with other
    bytes, or not at all, is foreign unless it is a kernelscope report. A folder whose marker lists no
    files is judged by each file's own content (and, in an advice folder, its exports by name)."""
    listed = marked_files(folder)

    def ours(p: Path) -> bool:
        if not p.is_file():
            return False
        if p.name == RUN_MARKER or is_kernelscope_report(p):
            return True
        if listed is not None:
            return p.name in listed and file_digest(p) == listed[p.name]
        return _ours_unlisted(p, folder)

    return sorted(p.name for p in folder.iterdir() if not ours(p))


def _ours_unlisted(file: Path, folder: Path) -> bool:
    """A file of a folder whose marker lists none: a versioned summary, a kernelscope table, or an export
    of an advice folder."""
    if file.name in SUMMARY_NAMES:
        return _versioned(file)
    if file.name in (*EXPORT_NAMES, *LEGACY_EXPORT_NAMES):
        return is_advice_folder(folder)
    return is_kernelscope_table(file)


def _versioned(file: Path) -> bool:
    """Whether ``file`` is a summary: a JSON object with an integer ``schema_version`` (an advice file of
    schema version 2 may lack it)."""
    try:
        body = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(body, dict) and (isinstance(body.get("schema_version"), int)
                                       or file.name == LEGACY_ADVICE)


def summary_of(folder: Path) -> Path | None:
    """The summary file of a run folder (``summary.json``, or an older folder's own name), or None."""
    return next((folder / n for n in SUMMARY_NAMES if (folder / n).is_file()), None)


def is_advice_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an ``advise`` run's summary (where the exports belong)."""
    if (folder / LEGACY_ADVICE).is_file():
        return True
    try:
        return json.loads((folder / SUMMARY).read_text(encoding="utf-8")).get("kind") == "advise"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _has_versioned_summary(folder: Path) -> bool:
    """A folder written before run folders carried the marker: one summary, with a schema version."""
    summaries = [folder / n for n in SUMMARY_NAMES if (folder / n).is_file()]
    return len(summaries) == 1 and _versioned(summaries[0])


def is_kernelscope_run(folder: Path) -> bool:
    """True when ``folder`` is a run folder kernelscope wrote (marked, or an unmarked older one) and
    holds nothing else."""
    if not folder.is_dir() or foreign_entries(folder):
        return False
    return (folder / RUN_MARKER).is_file() or _has_versioned_summary(folder)


def is_kernelscope_report(file: Path) -> bool:
    """True when ``file`` is an HTML report kernelscope wrote."""
    try:
        with file.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return REPORT_TAG.encode() in head


def _check_writable_parent(path: Path, option: str, shown: str | Path) -> None:
    """Prove the place of ``path`` writable by creating and removing a probe file in its parent (or in the
    nearest folder above that exists, where the parent is still to be made)."""
    probe = path.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise KernelscopeError(f"{option} {shown} cannot be written: {probe} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".kernelscope-probe.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise KernelscopeError(f"{option} {shown} cannot be written: {probe} refuses a new file "
                               f"({exc.strerror or exc}); give a path in a writable folder") from None


def _refuse_protected(path: Path, option: str, shown: str | Path, what: str) -> None:
    if path.resolve() in protected_paths():
        raise KernelscopeError(
            f"{option} {shown} is the working folder, one of its parents, the home folder or "
            f"the root, which kernelscope never replaces; give a {what}"
        )


def _checked_path(path: str | Path, option: str, what: str) -> Path:
    """``path`` expanded, after refusing an empty one, a symbolic link and the protected folders."""
    if not str(path).strip():
        raise KernelscopeError(f"{option} is empty; give a {what}")
    out = Path(path).expanduser()
    long = next((part for part in out.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if long is not None:
        raise KernelscopeError(f"{option} {path} has a name of {len(os.fsencode(long))} bytes, longer than "
                               f"the {NAME_MAX} a file system allows; give a shorter name")
    if out.is_symlink():
        raise KernelscopeError(f"{option} {path} is a symbolic link, which kernelscope never writes "
                               "through or "
                               f"replaces; give the {what} itself")
    _refuse_protected(out, option, path, what)
    return out


def check_output_dir(path: str | Path, overwrite: bool = False, option: str = "--output") -> Path:
    """Refuse early (before any work) an output folder that exists, unless it is a kernelscope run
    folder and ``overwrite`` is set, or that cannot be created."""
    out = _checked_path(path, option, "new folder such as runs/x")
    if out.exists() and not out.is_dir():
        raise KernelscopeError(f"{option} {path} exists and is not a folder; give a new folder")
    if out.exists() and not overwrite and is_kernelscope_run(out):
        raise KernelscopeError(f"{option} {path} already exists; pass --overwrite to replace it")
    if out.exists() and not is_kernelscope_run(out):
        foreign = foreign_entries(out)
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        why = (
            f"holds files kernelscope did not write ({listed})"
            if foreign
            else "was not written by kernelscope"
        )
        raise KernelscopeError(f"{option} {path} exists and {why}; it is never replaced: give a new folder")
    _check_writable_parent(out, option, path)
    return out


REPORT_SUFFIXES = (".html", ".htm")
"""What a report file's name ends with: a page, never a name another reader expects (a table, JSON)."""


def check_report_file(path: str | Path, overwrite: bool = False, option: str = "--report") -> Path:
    """Refuse early a report path that names a folder (a trailing slash), does not end in .html, exists
    (unless it is a kernelscope report and ``overwrite`` is set), or cannot be created."""
    out = _checked_path(path, option, "file name such as report.html")
    if str(path).endswith(("/", "\\")):
        raise KernelscopeError(f"{option} {path} names a folder; give a file name such as {path}report.html")
    if out.is_dir():
        raise KernelscopeError(f"{option} {path} is a folder; give a file name such as report.html")
    if out.suffix.lower() not in REPORT_SUFFIXES:
        raise KernelscopeError(f"{option} {path} does not end in .html; a report is an HTML page: give a "
                               f"name such as {out.with_suffix('.html').name}")
    if out.exists() and not overwrite and is_kernelscope_report(out):
        raise KernelscopeError(f"{option} {path} already exists; pass --overwrite to replace it")
    if out.exists() and not is_kernelscope_report(out):
        raise KernelscopeError(
            f"{option} {path} exists and is not a kernelscope report; it is never replaced: "
            "give a new file name"
        )
    _check_writable_parent(out, option, path)
    return out
