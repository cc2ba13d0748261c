"""What every model-running command does first: check options, read the text, load the model,
choose the windows; and the progress display."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kernelscope.cli.console import err, fail, flag, out, show_table
from kernelscope.errors import KernelscopeError


def load_with_status(model: str, dtype: str, device: str, trust_remote_code: bool, *, quiet: bool,
                     placement: dict | None = None):
    """Load a model behind a spinner on stderr. ``placement``: device_map, max_memory, offload_folder."""
    from kernelscope.models import load_model

    kwargs = dict(dtype=dtype, device=device, trust_remote_code=trust_remote_code, **(placement or {}))
    if quiet or not err.is_terminal:
        return load_model(model, **kwargs)
    with err.status(f"loading model {escape(model)} ..."):
        return load_model(model, **kwargs)


def check_positive(name: str, value: int | None, least: int = 1) -> None:
    if value is not None and value < least:
        fail(f"{flag(name)} must be at least {least}, got {value}")


def check_bits(bits: list[int], option: str = "--bits") -> None:
    for b in bits:
        if not 2 <= b <= 8:
            fail(f"{flag(option)} {b} is out of range; give a bit width from 2 to 8")


def check_alphas(alphas: list[float], option: str = "--alpha", hint: str = " (1 is per-token)") -> None:
    for a in alphas:
        if not 0.0 <= a <= 1.0:  # also false for NaN
            fail(f"{flag(option)} {a:g} is out of range; give a value in [0, 1]{hint}")


def split_values(values: list[str], option: str, convert: Callable[[str], Any], what: str) -> list[Any]:
    """Values given repeated or comma-separated: ``-a 0.15,0.45 -a 1`` -> [0.15, 0.45, 1.0].

    ``convert`` raises ValueError for a value that is not ``what`` (e.g. "a number").
    """
    parts = [p.strip() for v in values for p in v.split(",")]
    if not any(parts):
        fail(f"{flag(option)} needs at least one value")
    if not all(parts):
        typed = ",".join(values)
        fail(f"{flag(option)} {typed!r} has an empty item; give the values separated by single commas")
    out_values = []
    for part in parts:
        try:
            if "_" in part and convert in (int, float):
                raise ValueError("digits grouped with _")  # Python reads 0_1 as 1: a typo, not a number
            out_values.append(convert(part))
        except ValueError:
            fail(f"{flag(option)} {part!r} is not {what}; give values repeated ({flag(option)} A "
                 f"{flag(option)} B) or comma-separated ({flag(option)} A,B)")
    return out_values


def one_value(value: str, option: str, convert: Callable[[str], Any], what: str, several: str) -> Any:
    """A single value; a comma-separated list is refused with ``several`` (where lists are taken)."""
    if "," in value:
        fail(f"{flag(option)} {value!r}: this command takes one value; {several}")
    return split_values([value], option, convert, what)[0]


def refuse_unused(given: frozenset[str], **why_not: str | None) -> None:
    """Refuse each option the user gave that has no effect: ``why_not[name]`` says when it applies
    (None where it does apply)."""
    for name, why in why_not.items():
        if why is not None and name in given:
            fail(f"{flag(name)} has no effect here: {why}")


def common_refusals(*, windows: str, output, report, device_map,
                    seed_applies: bool = False) -> dict[str, str | None]:
    """When the options every model-running command shares have no effect."""
    return {
        "seed": None if seed_applies or windows.strip().lower() == "random"
        else "it seeds --windows random (add --windows random or drop --seed)",
        "overwrite": None if output is not None or report is not None
        else "it lets --output or --report replace an earlier result, and neither is given",
        "device": None if device_map is None
        else "with --device-map accelerate places the model; drop --device",
    }


@dataclass
class Prepared:
    loaded: Any
    text: Any
    windows: Any
    device: str


def check_paths_and_model(model: str, output: Path | None, overwrite: bool, report: Path | None, dtype: str,
                          device: str, layers: str | None) -> str:
    """Output paths, the model's source, dtype, device and --layers, checked before any loading; the
    device ``auto`` stands for."""
    from kernelscope.models import parse_device, parse_dtype, resolve_model_source
    from kernelscope.results import check_output_dir

    resolve_model_source(model)
    if output is not None:
        check_output_dir(output, overwrite, flag("--output"))
    check_report_path(report, overwrite, output)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = parse_device(device)
    except KernelscopeError as exc:
        fail(f"{flag('--device')}: {exc}")
    try:
        parse_dtype(dtype, torch_device)
    except KernelscopeError as exc:
        fail(f"{flag('--dtype')}: {exc}")
    if layers is not None:
        try:
            re.compile(layers)
        except re.error as exc:
            fail(f"{flag('--layers')} {layers!r} is not a valid regular expression: {exc}")
    return device


def prepare(*, model: str, dataset: str, nsamples: int | None, seqlen: int, windows: str, seed: int,
            layers: str | None, batch_size: int, dtype: str, device: str, trust_remote_code: bool,
            output: Path | None, overwrite: bool, quiet: bool, min_windows: int = 1, min_seqlen: int = 1,
            report: Path | None = None, device_map: str | None = None, max_memory: str | None = None,
            offload_folder: Path | None = None) -> Prepared:
    """Check everything that can be checked cheaply, then read text, load the model, cut windows.

    Nothing is written here; an existing ``output`` is refused before any work. ``min_seqlen`` 2 is
    for perplexity, which predicts every token of a window but the first.
    """
    from kernelscope.data import load_text, make_windows, tokenize
    from kernelscope.models.loading import check_placement

    check_positive("--nsamples", nsamples)
    check_positive("--seqlen", seqlen, min_seqlen)
    check_positive("--batch-size", batch_size)
    windows = windows.strip().lower()
    if windows not in ("first", "random"):
        fail(f"{flag('--windows')} must be `first` or `random`, got {windows!r}")
    if nsamples is not None and nsamples < min_windows:
        fail(f"{flag('--nsamples')} {nsamples} is too few windows; this command needs at least {min_windows}")
    device = check_paths_and_model(model, output, overwrite, report, dtype, device, layers)
    placement = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    check_placement(**placement)

    max_chars = 20 * nsamples * seqlen if nsamples is not None else None
    text = load_text(dataset, max_chars=max_chars, option=flag("--dataset"))
    loaded = load_with_status(model, dtype, device, trust_remote_code, quiet=quiet, placement=placement)
    limit = loaded.info.get("max_position_embeddings")
    if isinstance(limit, int) and seqlen > limit:
        fail(f"{flag('--seqlen')} {seqlen} is beyond the model's context of {limit} tokens")
    ids = tokenize(loaded.tokenizer, text.text)
    chosen = make_windows(ids, seqlen, nsamples, selection=windows, seed=seed,
                          names=("text", flag("--nsamples"), flag("--seqlen")))
    if len(chosen) < min_windows:
        fail(f"the text holds {len(chosen)} window(s) of {seqlen} tokens; this command needs at least "
             f"{min_windows}")
    return Prepared(loaded, text, chosen, device)


@contextlib.contextmanager
def stage_progress(quiet: bool, unit: str = "windows") -> Iterator[Any]:
    """A progress display with one bar per stage, counting ``unit``; yields ``update(stage, done, total)``."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn(unit), TimeElapsedColumn(), console=err,
                        disable=quiet or not err.is_terminal, transient=True)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done)

    with progress:
        yield update


def check_report_path(report: Path | None, overwrite: bool, output: Path | None = None) -> None:
    """Refuse early a report file that exists (unless --overwrite and kernelscope wrote it), is the
    output folder, or cannot be created."""
    from kernelscope.results import check_report_file

    if report is None:
        return
    if output is not None and report.expanduser().resolve() == output.expanduser().resolve():
        fail(f"{flag('--report')} {report} is the {flag('--output')} folder; give a file name such as "
             f"{output}/report.html")
    check_report_file(report, overwrite, flag("--report"))


def finish(result, output: Path | None, overwrite: bool, as_json: bool, show,
           report: Path | None = None) -> None:
    """Save (if asked) and write the report (if asked), both or neither, then print JSON or the human view."""
    from kernelscope.results import to_json

    if output is not None:
        result.summary["output"] = str(Path(output))
        stager = _report_stager(report, overwrite, output) if report is not None else None
        result.save(output, overwrite=overwrite, option=flag("--output"), alongside=stager)
    elif report is not None:
        from kernelscope.reports import write_report
        from kernelscope.results import RunFolder, json_safe

        tables = {result.TABLE: result.table} if hasattr(result, "TABLE") else {"layers": result.layers}
        run = RunFolder(Path(result.summary.get("kind", "run")),
                        json_safe({"schema_version": 1, **result.summary}), tables)
        write_report([run], report, overwrite=overwrite, option=flag("--report"))
    if as_json:
        print(to_json(result.summary, indent=2))
        return
    show(result)
    for path in (output, report):
        if path is not None:
            out.print(f"wrote [bold]{escape(str(path))}[/]")


def _report_stager(report: Path, overwrite: bool, output: Path):
    """What stages the report of a run folder once that folder is written in full (not yet in place)."""
    from kernelscope.reports import stage_report
    from kernelscope.results import read_run

    final = Path(output).expanduser().resolve()
    within = report.expanduser().resolve()
    inside = within.relative_to(final) if within.is_relative_to(final) else None

    def stage(folder: Path):
        run = read_run(folder)
        run.path = Path(output).expanduser()
        if inside is None:
            return stage_report([run], report, overwrite=overwrite, option=flag("--report"))
        stage_report([run], folder / inside, option=flag("--report")).commit()  # moves with its folder
        return None

    return stage


def header(summary: dict, title: str) -> Any:
    """The panel that says what was measured on what."""
    from rich.panel import Panel

    m = summary["model"]
    lines = [
        (f"[bold]model[/]   {escape(str(m.get('path', m.get('architecture'))))}  ({m.get('architecture')}, "
         f"{m.get('parameters', 0) / 1e6:.0f}M parameters, {m.get('dtype')}, {m.get('device')})"),
        f"[bold]text[/]    {escape(summary['text']['description'])}  sha256 {summary['text']['sha256'][:12]}",
        f"[bold]windows[/] {escape(summary['windows']['description'])}",
    ]
    if "protocol" in summary:
        lines.append(f"[bold]protocol[/] {escape(summary['protocol'])}")
    return Panel("\n".join(lines), title=title, expand=False)


def format_rows() -> list[dict[str, Any]]:
    """The formats registry as rows: what every format is, and how a command names it."""
    from kernelscope.quant.formats import FORMATS
    from kernelscope.runs.schemes import FLOAT_SCHEMES, FORMAT_WORDS, QUANTIZER_WORDS

    rows = []
    for name, entry in FORMATS.items():
        grid, rule = entry.grid, entry.rule
        spelled = next(word for word, n in FORMAT_WORDS.items() if n == name)
        unit = f"block of {entry.block_size}" if entry.block_size else rule.unit
        unit = "token i, channel j: t_i^α · c_j^(1-α)" if entry.takes_alpha else unit
        rows.append({
            "name": name, "grid": "int (--bits)" if grid is None else grid.name,
            "bits": None if grid is None else grid.bits, "max": None if grid is None else grid.max_value,
            "tau": entry.tau, "unit": rule.unit, "form": rule.form, "block_size": entry.block_size,
            "scale": unit if rule.form == "absmax" else f"{unit}, {rule.form}",
            "schemes": [s for s, n in FLOAT_SCHEMES.items() if n == name]
            + [f"wXaY[-gG]-{w}" for w, n in QUANTIZER_WORDS.items() if n == name],
            "remove_kernel": f"remove-kernel-{spelled}",
            "description": entry.description,
        })
    return rows


def show_formats(as_json: bool) -> None:
    """Print the formats registry as a table, or as JSON."""
    from rich.table import Table

    rows = format_rows()
    if as_json:
        from kernelscope.results import to_json

        print(to_json(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} number formats: -q NAME, --weight-format NAME, "
                        "--scheme remove-kernel-NAME")
    for col in ("name", "elements", "τ"):  # kept whole; the wide ones wrap on a narrow terminal
        table.add_column(col, no_wrap=True, min_width=max(len(col), 5))
    for col in ("scale over each", "--scheme"):
        table.add_column(col, overflow="fold")
    for r in rows:
        elements = r["grid"] if r["max"] is None else f"{r['grid']} (max {r['max']:g})"
        exponent = math.log2(r["tau"])
        tau = f"2^{exponent:.0f}" if exponent.is_integer() and exponent < -1 else f"{r['tau']:g}"
        table.add_row(escape(r["name"]), escape(elements), tau, escape(r["scale"]),
                      escape(", ".join(r["schemes"])))
    show_table(table)
    out.print("An element x is in the kernel where |x / scale| <= τ; `--json` gives every field.")
