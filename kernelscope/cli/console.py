"""The two consoles (tables on stdout, progress and errors on stderr) and the one way to fail."""

from __future__ import annotations

from rich.console import Console

from kernelscope.errors import KernelscopeError

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)
EXIT_USAGE = 2


def fail(message: str) -> None:
    """Raise the one-line error the CLI prints before exiting with status 2."""
    raise KernelscopeError(message)


def pct(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}%"
