"""What every model-running command does first: check options, read the text, load the model,
choose the windows; and the progress display."""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn
from rich.table import Column
from rich.text import Text

from kernelscope.cli.console import check_int64, err, fail, flag, out, show_table, since_started
from kernelscope.errors import KernelscopeError


def load_with_status(model: str, dtype: str, device: str, trust_remote_code: bool, *, quiet: bool,
                     placement: dict | None = None, display: Display | None = None):
    """Load a model behind a spinner on stderr, or as a stage of ``display`` where the command shows one.
    ``placement``: device_map, max_memory, offload_folder."""
    from kernelscope.models import load_model

    kwargs = dict(dtype=dtype, device=device, trust_remote_code=trust_remote_code, **(placement or {}))
    if display is not None:
        display.stage(f"loading model {model}")
        return load_model(model, **kwargs)
    if quiet or not err.is_terminal:
        return load_model(model, **kwargs)
    with err.status(f"loading model {escape(model)} ..."):
        return load_model(model, **kwargs)


def parse_nsamples(value: str | int | None) -> int | None:
    """``--nsamples`` as typed: a whole number of windows, or ``all`` (None: every window)."""
    if value is None or isinstance(value, int):
        return value
    typed = value.strip()
    if typed.lower() == "all":
        return None
    try:
        if "_" in typed:
            raise ValueError("digits grouped with _")  # Python reads 1_0 as 10: a typo, not a number
        number = int(typed)
    except ValueError:
        fail(f"{flag('--nsamples')} {value!r} is not a number of windows; give a whole number, or all for "
             "every window of the text")
    check_int64({"nsamples": number})
    return number


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


def prepare(*, model: str, dataset: str, nsamples: str | int | None, seqlen: int, windows: str, seed: int,
            layers: str | None, batch_size: int, dtype: str, device: str, trust_remote_code: bool,
            output: Path | None, overwrite: bool, quiet: bool, min_windows: int = 1, min_seqlen: int = 1,
            report: Path | None = None, device_map: str | None = None, max_memory: str | None = None,
            offload_folder: Path | None = None, display: Display | None = None) -> Prepared:
    """Check everything that can be checked cheaply, then read text, load the model, cut windows, each
    announced as a stage of ``display`` where one is given.

    Nothing is written here; an existing ``output`` is refused before any work. ``min_seqlen`` 2 is
    for perplexity, which predicts every token of a window but the first. ``nsamples``: a number, or
    ``all`` (None) for every window.
    """
    from kernelscope.data import load_text, make_windows, tokenize
    from kernelscope.models.loading import check_placement

    nsamples = parse_nsamples(nsamples)
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
    if display is not None:
        display.stage(f"reading the text ({flag('--dataset')} {dataset})")
    text = load_text(dataset, max_chars=max_chars, option=flag("--dataset"))
    loaded = load_with_status(model, dtype, device, trust_remote_code, quiet=quiet, placement=placement,
                              display=display)
    limit = loaded.info.get("max_position_embeddings")
    if isinstance(limit, int) and seqlen > limit:
        fail(f"{flag('--seqlen')} {seqlen} is beyond the model's context of {limit} tokens")
    if display is not None:
        display.stage(f"tokenizing the text and choosing {seqlen}-token windows")
    ids = tokenize(loaded.tokenizer, text.text)
    chosen = make_windows(ids, seqlen, nsamples, selection=windows, seed=seed,
                          names=("text", flag("--nsamples"), flag("--seqlen")))
    if len(chosen) < min_windows:
        fail(f"the text holds {len(chosen)} window(s) of {seqlen} tokens; this command needs at least "
             f"{min_windows}")
    return Prepared(loaded, text, chosen, device)


def clock(seconds: float) -> str:
    """A duration as a clock shows it: ``0:42``, ``12:05``, ``1:02:03``."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _Count(ProgressColumn):
    """How far a pass is (``3/8``), or the whole run (``37/120``, or ``pass 5`` where the number of
    passes is not known); the first line says what they count."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task: Task) -> Text:
        if task.total is not None:
            return Text(f"{int(task.completed)}/{int(task.total)}", style="progress.download")
        passes = task.fields.get("passes", 0)
        return Text(f"pass {passes}" if passes else "", style="progress.download")


class _Times(ProgressColumn):
    """The first line: the time since the command started and, where the work is known, the time left
    in all; a pass: its time left. Both estimated from the pace of the windows done so far."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True))

    def render(self, task: Task) -> Text:
        left = task.fields.get("left")
        if task.fields.get("role") == "header":
            shown = f"{clock(since_started())} elapsed"
            return Text(shown if left is None else f"{shown}, ~{clock(left)} left", style="progress.elapsed")
        if task.finished:
            return Text("done", style="progress.elapsed")
        return Text("" if left is None else f"~{clock(left)} left", style="progress.remaining")


class Display:
    """What a model-running command shows on stderr while it works, from its first second: the stage it
    is in (reading the text, loading the model, choosing windows) on a first line that counts the time
    since the command started; then, once :meth:`plan` has said how many forward passes follow, that
    line counts them with the time left in all, and a bar below it follows the current pass. Nothing
    is shown with ``--quiet``, with ``--json`` or where stderr is not a terminal (``progress`` None).
    Called as ``display(stage, done, total)``, it is a run's ``progress`` callback."""

    def __init__(self, progress: Progress | None, unit: str = "windows") -> None:
        self.progress, self.unit = progress, unit
        self.header: TaskID | None = None
        self.passes: dict[str, TaskID] = {}
        self.done: dict[str, int] = {}
        self.expected: int | None = None  # the windows of every pass together, where known
        # when the passes began (see plan), the current pass began, and the last window was done
        self.started = self.pass_started = self.last = time.monotonic()

    def stage(self, text: str) -> None:
        """Announce what the command does now; shown at once."""
        if self.progress is None:
            return
        if self.header is None:
            self.header = self.progress.add_task(escape(text), total=None, role="header")
        else:
            self.progress.update(self.header, description=escape(text))
        self.progress.refresh()

    def plan(self, what: str, passes: int | None, per_pass: int, note: str = "") -> None:
        """Say, before the work starts, what follows: ``passes`` forward passes (None where the run
        decides how many; ``note`` says how) over ``per_pass`` windows (or tasks) each."""
        self.started = self.pass_started = self.last = time.monotonic()
        count = f"{passes} pass{'es' * (passes != 1)}" if passes is not None else "passes"
        self.stage(f"{what}: {count} × {per_pass} {self.unit}" + (f" ({note})" if note else ""))
        if self.progress is not None and passes is not None:
            self.expected = passes * per_pass
            self.progress.update(self.header, total=self.expected, completed=0)

    def __call__(self, stage: str, done: int, total: int) -> None:
        """One pass (``stage``) has done ``done`` of its ``total`` windows."""
        if self.progress is None:
            return
        now = time.monotonic()
        new = stage not in self.passes
        if new:
            for earlier in self.passes.values():  # the finished passes are counted on the first line
                self.progress.update(earlier, visible=False)
            self.pass_started = self.last  # a pass reports its first window once it is done: it began before
            self.passes[stage] = self.progress.add_task(escape(stage), total=total, role="pass")
        self.done[stage] = done
        pace = (now - self.pass_started) / done if done else None
        self.progress.update(self.passes[stage], completed=done,
                             left=None if pace is None else pace * (total - done))
        self._update_header(now)
        self.last = now
        if new:
            self.progress.refresh()  # a new pass shows at once

    def _update_header(self, now: float) -> None:
        """The first line: passes begun, windows done, and the time left at the pace so far."""
        if self.header is None:
            self.header = self.progress.add_task("", total=None, role="header")
        finished = sum(self.done.values())
        left = None
        if self.expected is not None and finished:
            left = (now - self.started) / finished * max(self.expected - finished, 0)
        self.progress.update(self.header, completed=finished, passes=len(self.passes), left=left)


@contextlib.contextmanager
def stage_progress(quiet: bool, unit: str = "windows") -> Iterator[Display]:
    """The display of a model-running command (see :class:`Display`): start it before the command reads
    its text or loads its model, so that it shows from the first second; it is gone once the block ends."""
    shown = not quiet and err.is_terminal
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=12),
                        _Count(), _Times(), console=err, transient=True) if shown else None
    display = Display(progress, unit)
    if progress is None:
        yield display
        return
    with progress:
        yield display


def read_calibration(display: Display, needed: bool, calib_dataset: str, calib_nsamples: int, seqlen: int):
    """SmoothQuant's calibration text where a transform ``needed`` it (else None), read before the model
    loads (so that a missing one fails fast), as a stage of ``display``; read as far as the calibration
    windows need, as ``prepare`` reads the text."""
    from kernelscope.data import load_text

    if not needed:
        return None
    display.stage(f"reading the calibration text ({flag('--calib-dataset')} {calib_dataset})")
    return load_text(calib_dataset, max_chars=20 * calib_nsamples * seqlen, option=flag("--calib-dataset"))


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
