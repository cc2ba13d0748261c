"""The two consoles (tables on stdout, progress and errors on stderr), the one way to fail, and how
the options of the running command were typed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.console import Console

from kernelscope.errors import KernelscopeError

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)
EXIT_USAGE = 2

_typed: dict[str, str] = {}  # long option -> the spelling the user typed, for the running command
_opts: dict[str, list[str]] = {}  # parameter name -> its option strings, for the running command


def fail(message: str) -> None:
    """Raise the one-line error the CLI prints before exiting with status 2."""
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
