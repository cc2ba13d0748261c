"""The two consoles (tables on stdout, progress and errors on stderr), the one way to print a table,
the one way to fail, and how the options of the running command were typed."""

from __future__ import annotations

import copy
import io
import math
import os
import time
from collections.abc import Iterable, Sequence

from rich.cells import cell_len
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from kernelscope.errors import KernelscopeError


def _environ_int(name: str, default: int) -> int:
    """A whole number torchrun sets in the environment (``WORLD_SIZE``, ``RANK``), ``default`` where unset."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


UNDER_TORCHRUN = _environ_int("WORLD_SIZE", 1) > 1
"""Whether torchrun (or anything that sets ``WORLD_SIZE`` above 1) started this process; the same test
as :func:`kernelscope.runs.distributed.launched`, without importing torch."""
LATER_PROCESS = UNDER_TORCHRUN and _environ_int("RANK", 0) > 0
"""A process torchrun started other than the first: every process refuses the same options, and
only the first says so (its stderr console is quiet)."""
err = Console(stderr=True, highlight=False, quiet=LATER_PROCESS)
out = Console(highlight=False)
EXIT_USAGE = 2
"""The exit status of a refused run, in every process: a script must see that nothing ran. Under torchrun
the launcher then adds its own report of the failed processes (its ChildFailedError), after
kernelscope's one line from the first process; no kernelscope traceback."""

_started = [time.monotonic()]  # when the running command started: see mark_started


def mark_started() -> None:
    """Note that a command starts now: the progress display counts its elapsed time from here."""
    _started[0] = time.monotonic()


def since_started() -> float:
    """Seconds since the running command started."""
    return time.monotonic() - _started[0]


_typed: dict[str, str] = {}  # long option -> the spelling the user typed, for the running command
_opts: dict[str, list[str]] = {}  # parameter name -> its option strings, for the running command


def fail(message: str) -> None:
    """Raise the one-line error the CLI prints before exiting with status :data:`EXIT_USAGE`."""
    raise KernelscopeError(message)


def pct(x: float | None, digits: int = 2) -> str:
    """A share as a percentage; one too small for ``digits`` decimals (an FP8 kernel) in scientific form."""
    if x is None:
        return ""
    if 0 < abs(x) < 10.0 ** -(digits + 2):
        return f"{100 * x:.1e}%"
    return f"{100 * x:.{digits}f}%"


def remember_options(params: Iterable, args: Sequence[str]) -> None:
    """Note each option of the command about to run, and how ``args`` spelled it (``-a`` or ``--alpha``)."""
    _typed.clear()
    _opts.clear()
    for param in params:
        opts = [o for o in getattr(param, "opts", []) if o.startswith("-")]
        if not opts or param.name is None:
            continue
        _opts[param.name] = opts
        seen = [n for n in (_spelling(token) for token in args) if n in opts]
        if seen:
            _typed[opts[0]] = seen[0]
        if len(seen) > 1 and not getattr(param, "multiple", False):
            fail(f"{' and '.join(dict.fromkeys(seen))} given {len(seen)} times; {opts[0]} takes one value: "
                 "give it once")


INT64 = (-(2**63), 2**63 - 1)
"""The range of every whole-number option: the tables store them as int64, which every reader reads."""


def check_int64(values: dict) -> None:
    """Refuse a whole-number option outside int64, before it reaches a table that cannot hold it."""
    for name, value in values.items():
        numbers = value if isinstance(value, (list, tuple)) else [value]
        for v in numbers:
            if isinstance(v, int) and not isinstance(v, bool) and not INT64[0] <= v <= INT64[1]:
                fail(f"{flag(name)} {v} is out of range; give a whole number from -2^63 to 2^63-1")


def _spelling(token: str) -> str:
    """The option a command-line token names: ``--alpha`` for ``--alpha=0.3``, ``-a`` for ``-a0.3``."""
    return token.split("=", 1)[0] if token.startswith("--") else token[:2]


def flag(name: str) -> str:
    """The option ``name`` (a parameter name such as ``smooth_alpha``, or ``--smooth-alpha``) as the user
    typed it: ``-a`` when they wrote ``-a``, else its long form."""
    if not name.startswith("-"):
        opts = _opts.get(name)
        name = opts[0] if opts else "--" + name.replace("_", "-")
    return _typed.get(name, name)


_WIDE = 10_000  # a width at which every table is laid out whole
FOLD_LEAST = 12  # a ``fold`` column's values keep at least this many characters a line


def show_table(table: Table, console: Console | None = None) -> None:
    """Print ``table`` with every cell whole at the console's width: as rich lays it out where that cuts
    nothing; else with each column narrowed to what its cells need; else, too narrow for its columns, as
    one block of ``header: value`` lines per row. A number cut to ``16,267,2…`` would be misread."""
    console = console or out
    width = console.width
    least, widest = _column_ranges(table)
    if _whole(table, width, least):
        console.print(table)
        return
    narrowed = _narrowed(table, width, least, widest)
    if narrowed is not None and _whole(narrowed, width, least):
        console.print(narrowed)
        return
    _print_blocks(table, console)


def _probe(width: int, file: io.StringIO | None = None) -> Console:
    """A console like ``out`` at ``width``, writing plain text to ``file``: to lay out and measure with."""
    return Console(width=width, file=file or io.StringIO(), highlight=False, color_system=None,
                   force_terminal=False, force_jupyter=False, legacy_windows=False)


def _rendered(renderable: RenderableType, width: int) -> list[str]:
    """The lines ``renderable`` prints at ``width``, as plain text."""
    file = io.StringIO()
    _probe(width, file).print(renderable)
    return file.getvalue().splitlines()


def _column_ranges(table: Table) -> tuple[list[int], list[int]]:
    """Each column's least and widest width, padding included. The least keeps every word of its cells
    whole (a whole line where the column does not wrap; a ``fold`` column's long values may fold, to no
    fewer than :data:`FOLD_LEAST` characters a line), and its header's words up to that many characters."""
    console = _probe(_WIDE)
    options = console.options
    least, widest = [], []
    for index, column in enumerate(table.columns):
        header = Measurement.get(console, options, column.header)
        cells = [Measurement.get(console, options, cell) for cell in column.cells] or [Measurement(0, 0)]
        if column.no_wrap:
            need = max(m.maximum for m in cells)
        elif column.overflow == "fold":
            need = min(FOLD_LEAST, max(m.minimum for m in cells))
        else:
            need = max(m.minimum for m in cells)
        pad = table._get_padding_width(index)
        least.append(max(need, min(header.minimum, FOLD_LEAST)) + pad)
        widest.append(max(m.maximum for m in [header, *cells]) + pad)
    return least, widest


def _whole(table: Table, width: int, least: list[int]) -> bool:
    """Whether rich lays ``table`` out within ``width`` with no column under its least width and no cell
    cut to ``…`` (counted against the table laid out whole, in case a value holds one)."""
    console = _probe(width)
    widths = table._calculate_column_widths(console, console.options.update_width(width - table._extra_width))
    if any(w < need for w, need in zip(widths, least, strict=True)):
        return False
    lines = _rendered(table, width)
    cut = sum(line.count("…") for line in lines) > sum(line.count("…") for line in _rendered(table, _WIDE))
    return not cut and all(cell_len(line) <= width for line in lines)


def _narrowed(table: Table, width: int, least: list[int], widest: list[int]) -> Table | None:
    """``table`` with fixed column widths that fit ``width``: each column's least, and the room left
    shared in proportion to what each would take beyond it; None when the least widths do not fit."""
    spare = width - table._extra_width - sum(least)
    if spare < 0:
        return None
    beyond = [w - n for n, w in zip(least, widest, strict=True)]
    narrowed = copy.copy(table)
    narrowed.columns = []
    for index, column in enumerate(table.columns):
        share = min(beyond[index], beyond[index] * spare // max(sum(beyond), 1))
        fixed = copy.copy(column)
        fixed.width = least[index] + share - table._get_padding_width(index)
        fixed.header = _wrapping(column.header)
        narrowed.columns.append(fixed)
    return narrowed


def _wrapping(header: RenderableType) -> RenderableType:
    """A column header that wraps at its spaces and folds a word too long for its column, even in a
    column whose values do not wrap: a header is a name, and a folded name is still read whole."""
    if isinstance(header, str):
        header = Text.from_markup(header)
    if isinstance(header, Text):
        header = header.copy()
        header.no_wrap, header.overflow = False, "fold"
    return header


def _print_blocks(table: Table, console: Console) -> None:
    """``table`` under its title as one block of ``header: value`` lines per row, the blocks apart by a
    blank line; a long value wraps at the console's width, none is cut. Empty cells are left out."""
    if table.title:
        console.print(_one_line(table.title, console), style=table.title_style or "table.title")
    headers = [_one_line(column.header, console).plain for column in table.columns]
    for index, row in enumerate(zip(*(list(column.cells) for column in table.columns), strict=False)):
        if index:
            console.print()
        for header, cell in zip(headers, row, strict=True):
            value = _one_line(cell, console)
            if value.plain.strip():
                console.print(Text.assemble((f"{header}: ", "bold"), value))
    if table.caption:
        console.print(_one_line(table.caption, console), style=table.caption_style or "table.caption")


def _one_line(cell: RenderableType, console: Console) -> Text:
    """A cell (markup, Text or another renderable) as one line of text: its lines joined by spaces,
    since they were stacked only to fit a narrow column."""
    if isinstance(cell, str):
        text = console.render_str(cell, highlight=False)
    elif isinstance(cell, Text):
        text = cell.copy()
    else:
        text = Text("\n".join(_rendered(cell, console.width)))
    lines = text.split("\n")
    for line in lines:
        line.rstrip()
    return Text(" ").join(line for line in lines if line.plain.strip())


def _figure(x: float) -> str:
    """Four significant figures, decimals kept: 20.24, 790.9, 1235."""
    if not math.isfinite(x) or x == 0:
        return f"{x:.4g}"
    return f"{x:.{max(0, 3 - math.floor(math.log10(abs(x))))}f}"


def interval(low: float | None, high: float | None, fmt=_figure) -> str:
    """``[low, high]``, or nothing where there is no interval (one window)."""
    if low is None or high is None:
        return ""
    return f"[{fmt(low)}, {fmt(high)}]"


def _signed_pct(x: float) -> str:
    return f"{x:+.2f}"


def versus_fp(r: dict) -> str:
    """The paired change from fp over its interval; a change the interval does not separate from 0
    says so in words, so that it never reads as a loss."""
    if r.get("change_pct") is None:
        return ""
    lines = [f"{r['change_pct']:+.2f}%",
             interval(r["change_pct_ci_low"], r["change_pct_ci_high"], _signed_pct)]
    verdict = r.get("vs_fp") or ""
    if verdict.startswith("not separable"):
        lines.append("[yellow]not separable[/]")
    return "\n".join(line for line in lines if line)


def with_ci(r: dict) -> str:
    """A perplexity over its interval."""
    return "\n".join(filter(None, [f"{r['perplexity']:.4f}",
                                   interval(r["perplexity_ci_low"], r["perplexity_ci_high"])]))
