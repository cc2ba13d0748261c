"""The results' schema, declared once: its version, every table a run writes, and every column of
those tables with its type and meaning. One name has one meaning in every table it appears in, and a
column a run leaves empty in all of its rows (no CrossQuant α in an INT8-only evaluation, no weight
bits in a fp row) keeps its declared type, so that no table is written with columns of polars' Null
type, which other tools cannot read as numbers. The README's column list is :func:`markdown`'s text.

Every file a run writes carries :data:`SCHEMA_VERSION`: the summary (``summary.json``, whatever the
run) as ``schema_version``, each parquet table in its key-value metadata (``kernelscope.schema_version``,
with ``kernelscope.table`` and ``kernelscope.kind``).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

SCHEMA_VERSION = 3
"""2: profiles gained ``transform`` (and ``depth``), a sweep's ``kernel_fraction`` became the kernel of
its own quantized pass (``fp_kernel_fraction`` the one on fp activations), no Null-typed columns,
no absolute paths of the writing machine. 3: every run's summary is ``summary.json`` (``kind`` says
which run it is), and the sensitivity table's group kind is ``group_kind``."""


@dataclass(frozen=True)
class Column:
    dtype: pl.DataType
    meaning: str


TABLES: dict[str, str] = {
    "layers": "profile: one row per transform × Linear layer × quantizer configuration",
    "weights": "profile: one row per transform × Linear layer × weight quantizer",
    "eval": "eval: one row per scheme × transform",
    "sqnr": "eval --sqnr: one row per quantizing scheme × transform × covered Linear layer",
    "threshold": "threshold: one row per λ evaluated × transform",
    "sweep": "sweep: one row per transform × quantizer × α, and the fp reference",
    "zeroshot": "zeroshot: one row per scheme × task × accuracy metric",
    "zeroshot_items": "zeroshot: one row per scheme × task × document",
    "sensitivity": "advise: one row per group of layers (a layer, a module type, a block)",
    "cells": "advise: one row per cell (the layers of one module type in one block), most sensitive first",
    "search": "advise: one row per plan measured during the search",
    "candidates": "advise with several schemes or transforms: one row per scheme × transform, the one to "
                  "deploy first",
}
"""Every table a run writes (``<name>.parquet``), and what its rows are."""

_I, _F, _S, _B = pl.Int64, pl.Float64, pl.String, pl.Boolean

COLUMNS: dict[str, Column] = {
    # what a row is about
    "layer": Column(_S, "module name of the Linear layer"),
    "block": Column(_I, "index of the decoder block the layer (or cell) belongs to; empty outside the "
                        "blocks"),
    "module_type": Column(_S, "the layer's role within a block (q_proj, down_proj, ...)"),
    "depth": Column(_I, "the layer's index in capture order along the model"),
    "in_features": Column(_I, "the layer's input width"),
    "out_features": Column(_I, "the layer's output width"),
    "transform": Column(_S, "the basis a row was counted or quantized in (none, hadamard, smoothquant:0.5, "
                            "as given)"),
    "transform_seed": Column(_I, "seed of the transform's random signs; empty where it has none"),
    "transform_layers": Column(_S, "the layers the transform was applied to, in words; empty for none"),
    "config": Column(_S, "the quantizer configuration's label (per_token int8, crossquant a=0.15 int8, "
                         "mxfp4, ...)"),
    "quantizer": Column(_S, "the quantizer's registry name (per_token, crossquant, mxfp4, ...)"),
    "bits": Column(_I, "element width of the quantizer's grid (8 for FP8 and MXFP8, 4 for MXFP4 and NVFP4)"),
    "alpha": Column(_F, "CrossQuant's α; empty for other quantizers"),
    "format": Column(_S, "the number format of the quantizer's elements (int8, e4m3, e2m1, ...)"),
    "block_size": Column(_I, "channels per scale of a block format; empty for the others"),
    # counts
    "tokens": Column(_I, "tokens the row's pass saw (a profile, sqnr: the layer's input rows)"),
    "elements": Column(_I, "finite elements counted"),
    "kernel_elements": Column(_I, "elements in the kernel: those the quantizer rounds to zero"),
    "kernel_fraction": Column(_F, "kernel_elements / elements, in the row's own pass: the fp activations for "
                                  "a profile and for sqnr, the quantized pass for eval, threshold (the "
                                  "kernel removed at that λ), sweep, zeroshot and advise"),
    "fp_kernel_fraction": Column(_F, "the same configuration's kernel on the full-precision activations, in "
                                     "the row's basis"),
    "nonfinite_elements": Column(_I, "NaN and ±Inf elements, left out of every count"),
    "subnormal_elements": Column(_I, "elements that land on a non-zero subnormal code of a float grid; empty "
                                     "for INT"),
    "subnormal_fraction": Column(_F, "subnormal_elements / elements"),
    "blocks": Column(_I, "blocks of a block format (one scale each); empty for the others"),
    "kernel_blocks": Column(_I, "blocks whose every element is in the kernel"),
    "block_kernel_fraction": Column(_F, "kernel_blocks / blocks"),
    "zero_weights": Column(_I, "weights that are exactly zero before quantization"),
    # the zero bound and the ranges
    "abs_max": Column(_F, "the largest finite |x| (a weight: |w|) the layer saw"),
    "bound_mean": Column(_F, "mean zero bound over the positions: the |x| under which an element quantizes "
                             "to zero"),
    "bound_min": Column(_F, "smallest zero bound"),
    "bound_max": Column(_F, "largest zero bound"),
    "bound_p50": Column(_F, "median zero bound, from a log histogram of 100 bins a decade (relative error "
                            "< 2.33%)"),
    "bound_p90": Column(_F, "90th percentile of the zero bound, likewise"),
    "bound_p99": Column(_F, "99th percentile of the zero bound, likewise"),
    "bound_below_per_token_fraction": Column(_F, "share of positions whose step is below the per-token step "
                                                 "of the same width; empty where no comparison applies"),
    "c_ge_t_pairs": Column(_I, "pairs (i, j) of one sequence with c_j ≥ t_i: where CrossQuant cannot lower "
                               "the bound"),
    "c_ge_t_fraction": Column(_F, "c_ge_t_pairs over the positions, non-finite ones included"),
    "top_channels": Column(pl.List(_I), "the input channels with the largest c_j, largest first"),
    "top_channel_absmax": Column(pl.List(_F), "their c_j"),
    "top_tokens": Column(pl.List(_S), "the tokens with the largest t_i, as text"),
    "top_token_ids": Column(pl.List(_I), "their token ids"),
    "top_token_positions": Column(pl.List(_I), "their positions in the tokenized text"),
    "top_token_window_positions": Column(pl.List(_I), "their positions in their window; 0 is the first token "
                                                       "(the attention sink)"),
    "top_token_absmax": Column(pl.List(_F), "their t_i"),
    # schemes
    "scheme": Column(_S, "the evaluation scheme's name (fp, w8a8-per-token, mxfp4, remove-kernel-per-token, "
                         "...)"),
    "mode": Column(_S, "what the scheme does: fp, fake_quant or remove_kernel"),
    "activation_quantizer": Column(_S, "the registry name of the scheme's activation quantizer; empty for "
                                       "fp"),
    "activation_bits": Column(_I, "its element width"),
    "activation_format": Column(_S, "its configuration's label"),
    "weight_bits": Column(_I, "element width of the scheme's weight quantizer; empty where weights stay fp"),
    "weight_format": Column(_S, "the weights' format where a scheme names one of the registry (fp8, mxfp4, "
                                "nvfp4, ...); empty for INT weights, which weight_bits and group_size "
                                "describe"),
    "group_size": Column(_I, "inputs per weight scale (g128); empty for per-output-channel weights"),
    "arithmetic": Column(_S, "whose arithmetic the scheme computes: kernelscope (the paper's formats) or the "
                             "deploying library and the version it was checked against, bit for bit "
                             "(llm-compressor:NAME schemes)"),
    "kernel_scale": Column(_F, "remove-kernel's scale multiplier; empty for other modes"),
    "lambda": Column(_F, "remove-kernel's λ: kernel elements are those with |x| ≤ λ times the bound"),
    # perplexity and its comparison with fp
    "perplexity": Column(_F, "exp of the mean next-token NLL over every scored token"),
    "perplexity_ci_low": Column(_F, "lower end of its 95% interval (window bootstrap)"),
    "perplexity_ci_high": Column(_F, "upper end of its 95% interval"),
    "nll": Column(_F, "mean next-token negative log-likelihood, nats a token"),
    "window_nll": Column(pl.List(_F), "mean NLL of each window, in window order"),
    "windows": Column(_I, "windows scored"),
    "finite": Column(_B, "False where the model produced NaN or ±Inf logits"),
    "seconds": Column(_F, "wall-clock seconds of the row's pass"),
    "delta_nll": Column(_F, "mean NLL minus fp's on the same windows (paired), nats a token"),
    "delta_nll_ci_low": Column(_F, "lower end of its 95% interval"),
    "delta_nll_ci_high": Column(_F, "upper end of its 95% interval"),
    "change_pct": Column(_F, "perplexity change from fp, %: 100·(exp(delta_nll) − 1)"),
    "change_pct_ci_low": Column(_F, "lower end of its 95% interval"),
    "change_pct_ci_high": Column(_F, "upper end of its 95% interval"),
    "vs_fp": Column(_S, "worse than fp / better than fp / not separable from fp, from the interval"),
    # a layer's output error (eval --sqnr)
    "sqnr_db": Column(_F, "10·log10(Σ y² / Σ (y − ŷ)²) in dB of the layer's output y = x·Wᵀ (bias left out) "
                          "on the full-precision model's inputs, ŷ with the scheme's activations and weights "
                          "quantized (float64 sums over every window); empty where the output is exact "
                          "(infinite SQNR, which JSON cannot hold)"),
    "sqnr_activations_db": Column(_F, "the same with only the activations quantized; empty where the scheme "
                                      "leaves them in full precision or the output is exact"),
    "sqnr_weights_db": Column(_F, "the same with only the weights quantized; empty where the scheme leaves "
                                  "them in full precision or the output is exact"),
    "within_tolerance": Column(_B, "whether the perplexity is within the tolerance asked for"),
    "within_probability": Column(_F, "how often it is, over resampled windows"),
    # zero-shot
    "task": Column(_S, "the zero-shot task"),
    "metric": Column(_S, "the accuracy metric (acc, acc_norm)"),
    "filter": Column(_S, "the harness's answer filter"),
    "accuracy": Column(_F, "accuracy, 0 to 1"),
    "stderr": Column(_F, "its standard error"),
    "items": Column(_I, "documents scored"),
    "num_fewshot": Column(_I, "few-shot examples in each prompt"),
    "change_from_fp": Column(_F, "accuracy minus fp's, 0 to 1"),
    "doc_id": Column(_I, "the document's index in the task"),
    "target": Column(_S, "the right answer"),
    "loglikelihoods": Column(pl.List(_F), "each choice's log-likelihood"),
    "greedy": Column(pl.List(_B), "whether each choice is the greedy continuation"),
    "acc": Column(_F, "1 when the highest log-likelihood is the right answer's"),
    "acc_norm": Column(_F, "the same with length-normalised log-likelihoods"),
    # advise
    "group_kind": Column(_S, "what a sensitivity group is: layer, module_type or block"),
    "group": Column(_S, "the group's name"),
    "layers": Column(pl.List(_S), "the group's (or cell's) layers"),
    "layer_count": Column(_I, "how many"),
    "parameters": Column(_I, "their weights' parameters"),
    "parameter_share": Column(_F, "their share of the measured layers' parameters"),
    "first_block": Column(_I, "the first block the group's pass recomputed (the blocks before are cached)"),
    "kl": Column(_F, "mean KL divergence of the next-token distribution from fp's, nats a token"),
    "cost": Column(_F, "the pass's work in full forward passes (the share of the Linear work it recomputed)"),
    "rank": Column(_I, "1 = most sensitive within its kind (sensitivity); 1 = the candidate to deploy "
                       "(candidates)"),
    "deployable": Column(_S, "exact (a library quantizes exactly as measured), approximate (a library "
                             "applies the transform its own way: measure again after applying) or none "
                             "(a diagnostic, never recommended)"),
    "deploy_with": Column(_S, "which library and file deploys the candidate, or why none can"),
    "parameter_share_kept": Column(_F, "share of the covered Linear parameters the plan keeps in full "
                                       "precision"),
    "bits_per_weight": Column(_F, "bits a covered weight parameter costs under the plan: kept layers at 16, "
                                  "quantized ones at their element width plus their block scales' share"),
    "selection_change_pct": Column(_F, "the plan's change from fp on the windows it was chosen on, %"),
    "selection_within_tolerance": Column(_B, "whether the plan held the tolerance on the windows it was "
                                             "chosen on"),
    "held_out": Column(_B, "whether the figures of the row were measured on held-out windows (the plan was "
                           "not chosen on them)"),
    "cell": Column(_S, "the cell's name: block and module types"),
    "module_types": Column(pl.List(_S), "the cell's module types"),
    "estimated_delta_nll": Column(_F, "the loss in delta_nll estimated for keeping the cell quantized"),
    "estimated_kl": Column(_F, "the same in KL"),
    "stage": Column(_S, "which step of the search measured the plan"),
    "kept_cells": Column(_I, "cells the plan keeps in full precision"),
    "kept_layers": Column(_I, "layers it keeps"),
    "kernel_share": Column(_F, "share of the group's loss that removing its kernel alone reproduces"),
    "kernel_share_ci_low": Column(_F, "lower end of its 95% interval"),
    "kernel_share_ci_high": Column(_F, "upper end of its 95% interval"),
}
"""Every column of every table, its type and its meaning."""

KERNEL_REMOVED = ("perplexity", "perplexity_ci_low", "perplexity_ci_high", "nll", "window_nll", "delta_nll",
                  "delta_nll_ci_low", "delta_nll_ci_high", "change_pct", "change_pct_ci_low",
                  "change_pct_ci_high", "vs_fp", "kl", "kernel_fraction", "cost", "seconds")
"""The sensitivity figures measured a second time with only the group's kernel removed (``kernel_<name>``)."""
COLUMNS |= {f"kernel_{name}": Column(COLUMNS[name].dtype, f"(advise) {name} with only the group's kernel "
                                                          "removed, its quantization otherwise left out")
            for name in KERNEL_REMOVED}


def conformed(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with every column in its declared type, so that every parquet reader (pyarrow, pandas,
    polars) reads every table. A column that is not declared, or holds a value its declared type cannot
    (a whole number beyond int64), is an error: the options that feed a table refuse such values first."""
    undeclared = [name for name in frame.columns if name not in COLUMNS]
    if undeclared:
        raise ValueError(f"columns {undeclared} are not declared in the results schema")
    casts = {name: COLUMNS[name].dtype for name, dtype in frame.schema.items()
             if dtype != COLUMNS[name].dtype}
    try:
        return frame.cast(casts, strict=True) if casts else frame
    except pl.exceptions.PolarsError as exc:
        raise ValueError(f"a table column holds values outside its declared type: {exc}") from None


def parquet_metadata(table: str, kind: str | None) -> dict[str, str]:
    """The key-value metadata of a parquet table a run writes."""
    return {"kernelscope.schema_version": str(SCHEMA_VERSION), "kernelscope.table": table,
            "kernelscope.kind": kind or ""}


def _type_name(dtype: pl.DataType) -> str:
    return f"list of {_type_name(dtype.inner)}" if isinstance(dtype, pl.List) else {
        pl.Int64: "int64", pl.Float64: "float64", pl.String: "string", pl.Boolean: "bool"}[dtype]


def markdown() -> str:
    """The tables and the columns as the README lists them."""
    lines = ["| table | rows |", "|---|---|", *(f"| `{t}.parquet` | {rows} |" for t, rows in TABLES.items()),
             "", "| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {_type_name(col.dtype)} | {col.meaning} |" for name, col in COLUMNS.items()
              if not name.startswith("kernel_") or name.removeprefix("kernel_") not in KERNEL_REMOVED]
    lines.append(f"| `kernel_<figure>` | as `<figure>` | (advise) {', '.join(KERNEL_REMOVED)} with only the "
                 "group's kernel removed |")
    return "\n".join(lines)
