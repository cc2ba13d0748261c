"""The results' schema, declared once: its version, and the type of every column that a run may leave
empty in all of its rows (no CrossQuant α in an INT8-only evaluation, no weight bits in a fp row), so
that no table is written with columns of polars' Null type, which other tools cannot read as numbers.

Every file a run writes carries :data:`SCHEMA_VERSION`: the summary as ``schema_version``, each parquet
table in its key-value metadata (``kernelscope.schema_version``, with ``kernelscope.table`` and
``kernelscope.kind``).
"""

from __future__ import annotations

import polars as pl

SCHEMA_VERSION = 2
"""2: profiles gained ``transform`` (and ``depth``), a sweep's ``kernel_fraction`` became the kernel of
its own quantized pass (``fp_kernel_fraction`` the one on fp activations), no Null-typed columns,
no absolute paths of the writing machine."""

OPTIONAL_COLUMNS: dict[str, pl.DataType] = {
    "alpha": pl.Float64, "smooth_alpha": pl.Float64, "kernel_scale": pl.Float64, "lambda": pl.Float64,
    "bits": pl.Int64, "weight_bits": pl.Int64, "group_size": pl.Int64, "block": pl.Int64, "block_size": pl.Int64,
    "transform_seed": pl.Int64, "subnormal_elements": pl.Int64, "blocks": pl.Int64, "kernel_blocks": pl.Int64,
    "subnormal_fraction": pl.Float64, "block_kernel_fraction": pl.Float64,
    "bound_below_per_token_fraction": pl.Float64, "kernel_fraction": pl.Float64, "fp_kernel_fraction": pl.Float64,
    "kernel_elements": pl.Int64, "elements": pl.Int64, "delta_nll": pl.Float64, "change_pct": pl.Float64,
    "change_from_fp": pl.Float64, "stderr": pl.Float64,
    "weight_format": pl.String, "transform_layers": pl.String, "quantizer": pl.String, "vs_fp": pl.String,
    "format": pl.String, "scheme": pl.String, "transform": pl.String,
}
"""Columns that may be empty in every row, and their type then. A column of another name that holds
nothing at all is written as text; name it here to give it its type."""


def typed(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with each Null-typed column cast to its declared type (or text)."""
    casts = {name: OPTIONAL_COLUMNS.get(name, pl.String) for name, dtype in frame.schema.items() if dtype == pl.Null}
    return frame.cast(casts) if casts else frame


def parquet_metadata(table: str, kind: str | None) -> dict[str, str]:
    """The key-value metadata of a parquet table a run writes."""
    return {"kernelscope.schema_version": str(SCHEMA_VERSION), "kernelscope.table": table,
            "kernelscope.kind": kind or ""}
