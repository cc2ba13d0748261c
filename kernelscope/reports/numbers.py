"""The report's number formatters, one per unit, used by every table, sentence and hover label of the
page (its script writes the layer table's cells by the same rules, in ``report.js``), so that one
quantity never reads two ways: a percentage with two decimals, or two significant digits where it is
below 0.01% (a nonzero value never reads as 0, and nothing reads as -0.00%); a magnitude with four
significant digits, as ``6.619×10⁻⁷`` outside [0.001, 100,000); a count with thousands separators; bits per
weight with two decimals."""

from __future__ import annotations

import math

SMALLEST_DECIMALS = 6
"""Below ``10**-SMALLEST_DECIMALS`` (in the unit shown) a nonzero value reads ``<0.000001``."""
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _missing(x: float | None) -> bool:
    """No value to write: None, or NaN (a pass whose loss overflowed)."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def _digits(x: float) -> str:
    """``|x|`` with two decimals, or with two significant digits below 0.01, thousands separated."""
    a = abs(x)
    if a == 0:
        return "0.00"
    if a >= 0.01:
        return f"{a:,.2f}"
    if a < 10.0 ** -SMALLEST_DECIMALS:
        return f"<{10.0 ** -SMALLEST_DECIMALS:.{SMALLEST_DECIMALS}f}"
    return f"{a:.{1 - math.floor(math.log10(a))}f}"


def _signed(x: float, signed: bool) -> str:
    """:func:`_digits` of ``x`` with its sign: ``-`` where negative, ``+`` where positive and ``signed``."""
    body = _digits(x)
    if x < 0:
        return "-" + body
    return ("+" if signed and x > 0 else "") + body


def percent(x: float | None, *, signed: bool = False) -> str:
    """A value already in percent (a change from fp): ``2.97%``, ``+0.0021%``, empty where there is none."""
    return "" if _missing(x) else _signed(x, signed) + "%"


def share(fraction: float | None, *, signed: bool = False) -> str:
    """A fraction (a kernel proportion, a share of a loss) in percent: ``0.0034`` → ``0.34%``."""
    return "" if _missing(fraction) else percent(100 * fraction, signed=signed)


def points(x: float | None, *, signed: bool = True, unit: str = " pt") -> str:
    """A difference of two percentages, in percentage points: ``+1.23 pt``."""
    return "" if _missing(x) else _signed(x, signed) + unit


def magnitude(x: float | None) -> str:
    """A measured magnitude (|x|, a zero bound, a KL divergence) to four significant digits:
    ``12.35``, ``0.001234``, ``6.619×10⁻⁷``."""
    if _missing(x):
        return ""
    if x == 0:
        return "0"
    a = abs(x)
    if 1e-3 <= a < 1e5:
        return f"{x:,.{max(0, 3 - math.floor(math.log10(a)))}f}"
    mantissa, exponent = f"{x:.3e}".split("e")
    return f"{mantissa}×10{str(int(exponent)).translate(_SUPERSCRIPT)}"


def count(n: int | None) -> str:
    """A whole number with thousands separators: ``2,044``."""
    return "" if n is None else f"{int(n):,}"


def bits(x: float | None) -> str:
    """Bits per weight parameter, to two decimals (block scales and kept layers make fractions):
    ``4.25``."""
    return "" if _missing(x) else f"{x:,.2f}"


def perplexity(x: float | None) -> str:
    """A perplexity to four decimals, thousands separated: ``1,041.9353``."""
    return "" if _missing(x) else f"{x:,.4f}"


def interval(low: float | None, high: float | None, form=percent, **options) -> str:
    """``[low, high]``, each as ``form`` writes it; empty where either end is missing."""
    if _missing(low) or _missing(high):
        return ""
    return f"[{form(low, **options)}, {form(high, **options)}]"
