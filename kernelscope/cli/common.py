"""What every model-running command does first: check options, read the text, load the model,
choose the windows; and the progress display."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kernelscope.cli.console import err, fail, out


def load_with_status(model: str, dtype: str, device: str, trust_remote_code: bool, *, quiet: bool,
                     placement: dict | None = None):
    """Load a model behind a spinner on stderr. ``placement``: device_map, max_memory, offload_folder."""
    from kernelscope.models import load_model

    kwargs = dict(dtype=dtype, device=device, trust_remote_code=trust_remote_code, **(placement or {}))
    if quiet or not err.is_terminal:
        return load_model(model, **kwargs)
    with err.status(f"loading model {escape(model)} ..."):
        return load_model(model, **kwargs)


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        fail(f"{name} must be at least 1, got {value}")


@dataclass
class Prepared:
    loaded: Any
    text: Any
    windows: Any
    device: str


def prepare(*, model: str, dataset: str, nsamples: int | None, seqlen: int, windows: str, seed: int,
            layers: str | None, batch_size: int, dtype: str, device: str, trust_remote_code: bool,
            output: Path | None, overwrite: bool, quiet: bool, min_windows: int = 1,
            report: Path | None = None, device_map: str | None = None, max_memory: str | None = None,
            offload_folder: Path | None = None) -> Prepared:
    """Check everything that can be checked cheaply, then read text, load the model, cut windows.

    Nothing is written here; an existing ``output`` is refused before any work.
    """
    from kernelscope.data import load_text, make_windows, tokenize
    from kernelscope.models import parse_device, parse_dtype, resolve_model_source
    from kernelscope.models.loading import check_placement
    from kernelscope.results import check_output_dir

    check_positive("--nsamples", nsamples)
    check_positive("--seqlen", seqlen)
    check_positive("--batch-size", batch_size)
    if windows not in ("first", "random"):
        fail(f"--windows must be `first` or `random`, got {windows!r}")
    if nsamples is not None and nsamples < min_windows:
        fail(f"--nsamples {nsamples} is too few windows; this command needs at least {min_windows}")
    resolve_model_source(model)
    if output is not None:
        check_output_dir(output, overwrite)
    check_report_path(report, overwrite, output)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    parse_dtype(dtype, parse_device(device))
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    check_placement(**placement)
    if layers is not None:
        try:
            re.compile(layers)
        except re.error as exc:
            fail(f"--layers {layers!r} is not a valid regular expression: {exc}")

    max_chars = 20 * nsamples * seqlen if nsamples is not None else None
    text = load_text(dataset, max_chars=max_chars)
    loaded = load_with_status(model, dtype, device, trust_remote_code, quiet=quiet, placement=placement)
    limit = loaded.info.get("max_position_embeddings")
    if isinstance(limit, int) and seqlen > limit:
        fail(f"--seqlen {seqlen} is beyond the model's context of {limit} tokens")
    ids = tokenize(loaded.tokenizer, text.text)
    chosen = make_windows(ids, seqlen, nsamples, selection=windows, seed=seed)
    if len(chosen) < min_windows:
        fail(f"the text holds {len(chosen)} window(s) of {seqlen} tokens; this command needs at least {min_windows}")
    return Prepared(loaded, text, chosen, device)


@contextlib.contextmanager
def stage_progress(quiet: bool) -> Iterator[Any]:
    """A progress display with one bar per stage; yields ``update(stage, done, total)``."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("windows"), TimeElapsedColumn(), console=err,
                        disable=quiet or not err.is_terminal, transient=True)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done)

    with progress:
        yield update


def check_report_path(report: Path | None, overwrite: bool, output: Path | None = None) -> None:
    """Refuse early a report file that exists (unless --overwrite), is the output folder, or
    cannot be created."""
    if report is None:
        return
    if output is not None and report.expanduser().resolve() == output.expanduser().resolve():
        fail(f"--report {report} is the --output folder; give a file name such as {output}/report.html")
    if report.is_dir():
        fail(f"--report {report} is a folder; give a file name such as report.html")
    if report.exists() and not overwrite:
        fail(f"--report {report} already exists; pass --overwrite to replace it")
    probe = report.expanduser().resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        fail(f"--report {report} cannot be written: {probe} is not a writable folder")


def finish(result, output: Path | None, overwrite: bool, as_json: bool, show, report: Path | None = None) -> None:
    """Save (if asked), write the report (if asked), then print JSON or the human view."""
    if output is not None:
        result.summary["output"] = str(Path(output))
        result.save(output, overwrite=overwrite)
    if report is not None:
        from kernelscope.reports import write_report
        from kernelscope.results import RunFolder, json_safe, read_run

        tables = {result.TABLE: result.table} if hasattr(result, "TABLE") else {"layers": result.layers}
        run = read_run(output) if output is not None else RunFolder(
            Path(result.summary.get("kind", "run")), json_safe({"schema_version": 1, **result.summary}), tables)
        write_report([run], report, overwrite=overwrite)
    if as_json:
        print(json.dumps(result.summary, indent=2, default=str))
        return
    show(result)
    for path in (output, report):
        if path is not None:
            out.print(f"wrote [bold]{escape(str(path))}[/]")


def header(summary: dict, title: str) -> Any:
    """The panel that says what was measured on what."""
    from rich.panel import Panel

    m = summary["model"]
    lines = [
        f"[bold]model[/]   {escape(str(m.get('path', m.get('architecture'))))}  ({m.get('architecture')}, "
        f"{m.get('parameters', 0) / 1e6:.0f}M parameters, {m.get('dtype')}, {m.get('device')})",
        f"[bold]text[/]    {escape(summary['text']['description'])}  sha256 {summary['text']['sha256'][:12]}",
        f"[bold]windows[/] {escape(summary['windows']['description'])}",
    ]
    if "protocol" in summary:
        lines.append(f"[bold]protocol[/] {escape(summary['protocol'])}")
    return Panel("\n".join(lines), title=title, expand=False)
