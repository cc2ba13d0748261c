"""Write the references generated from the code's own declarations: the results schema
(``reference/columns.md``) and the number formats registry (``reference/formats.md``).

Run ``python docs/generate.py`` after changing either declaration; a test fails while a file here is
not what this script writes.
"""

from __future__ import annotations

import math
from pathlib import Path

HERE = Path(__file__).resolve().parent


def columns() -> str:
    from kernelscope.results.schema import SCHEMA_VERSION, markdown

    return (f"# Tables and columns (schema version {SCHEMA_VERSION})\n\n"
            "Generated from `kernelscope/results/schema.py` by `python docs/generate.py`: every table a run "
            "writes, and every column with its type and meaning. One name has one meaning in every table "
            "it appears in.\n\n" + markdown() + "\n")


def formats() -> str:
    from kernelscope.cli.common import format_rows

    lines = ["# Number formats", "",
             ("Generated from `kernelscope.quant.formats.FORMATS` by `python docs/generate.py` (the same "
              "rows as `kernelscope formats --json`). An element is in a format's kernel when "
              "|x / scale| <= τ."), "",
             "| name | elements | bits | largest | τ | scale | schemes | description |",
             "|---|---|---|---|---|---|---|---|"]
    for r in format_rows():
        cells = [f"`{r['name']}`", r["grid"], "" if r["bits"] is None else str(r["bits"]),
                 "" if r["max"] is None else f"{r['max']:g}", _number(r["tau"]), r["scale"],
                 ", ".join(f"`{s}`" for s in [*r["schemes"], r["remove_kernel"]]), r["description"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(x: float) -> str:
    """A power of two below 1/100 as 2^-k (τ of FP8 is 2^-10), any other number as it reads."""
    exponent = math.log2(x) if x > 0 else 0.0
    return f"2^{int(exponent)}" if x < 0.01 and exponent == int(exponent) else f"{x:g}"


GENERATED = {"reference/columns.md": columns, "reference/formats.md": formats}
"""Each generated file, relative to this folder, and what writes it."""


def main() -> None:
    for name, text in GENERATED.items():
        (HERE / name).write_text(text(), encoding="utf-8")


if __name__ == "__main__":
    main()
