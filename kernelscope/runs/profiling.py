"""``profile``: kernel statistics of every selected Linear input over a set of windows."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import nn

from kernelscope.capture import LinearInputCapture
from kernelscope.data import TextSource, Windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant import QuantizerConfig
from kernelscope.results import write_run
from kernelscope.runs import distributed
from kernelscope.runs.checkpoint import load_checkpoint, save_checkpoint
from kernelscope.runs.common import resolve_layers, run_context, unpack, versions
from kernelscope.runs.forward import eval_mode, forward_windows, model_device
from kernelscope.runs.weights import DEFAULT_WEIGHT_FORMAT, weight_kernels, weight_rollup
from kernelscope.stats import KernelStats, elementwise
from kernelscope.stats.arena import Arena
from kernelscope.stats.format_stats import FormatStats
from kernelscope.stats.kernel import (
    HISTOGRAM,
    QUANTILES,
    KernelStatsGroup,
    Measured,
    measure,
    measured_nbytes,
    results,
    summarise_groups,
)

_LAYER_WIDE = QuantizerConfig("per_token", 8)
"""Measured, and not reported, when every quantizer asked for is a format counted element by element:
the pass over t and c gives the layer-wide figures (elements, c >= t, outliers) all the same."""

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(windows_done, windows_total)`` after each batch."""


@dataclass
class ProfileResult:
    """Per-layer statistics (``layers``), model-level and per-module-type roll-ups, and a summary."""

    layers: pl.DataFrame  # one row per layer x quantizer configuration
    model_level: pl.DataFrame  # one row per configuration
    by_module_type: pl.DataFrame  # one row per module type x configuration
    summary: dict[str, Any]
    weights: pl.DataFrame | None = None  # one row per layer x weight quantizer

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``layers.parquet``, ``weights.parquet`` and ``summary.json`` to ``path`` atomically."""
        tables = {"layers": self.layers} | ({} if self.weights is None else {"weights": self.weights})
        return write_run(path, tables, self.summary, overwrite=overwrite)


def _sum_or_null(column: str) -> pl.Expr:
    """The sum of a count column, null where no row has it (a figure the quantizer does not have)."""
    col = pl.col(column)
    return pl.when(col.null_count() == pl.len()).then(None).otherwise(col.sum()).alias(column)


def _rollup(layers: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Element-weighted kernel fraction (and c >= t share) over the rows of each group."""
    return (
        layers.group_by(by, maintain_order=True)
        .agg(
            pl.len().alias("layers"),
            pl.col("elements").sum(),
            pl.col("kernel_elements").sum(),
            pl.col("nonfinite_elements").sum(),
            pl.col("c_ge_t_pairs").sum(),
            *(_sum_or_null(c) for c in ("subnormal_elements", "blocks", "kernel_blocks")),
        )
        .with_columns(
            (pl.col("kernel_elements") / pl.col("elements")).alias("kernel_fraction"),
            (pl.col("c_ge_t_pairs") / (pl.col("elements") + pl.col("nonfinite_elements"))).alias("c_ge_t_fraction"),
            (pl.col("subnormal_elements") / pl.col("elements")).alias("subnormal_fraction"),
            (pl.col("kernel_blocks") / pl.col("blocks")).alias("block_kernel_fraction"),
        )
    )


LIST_COLUMNS = {"top_channels": pl.Int64, "top_channel_absmax": pl.Float64, "top_tokens": pl.String,
                "top_token_ids": pl.Int64, "top_token_positions": pl.Int64, "top_token_absmax": pl.Float64}


def _table(rows: list[dict[str, Any]], overrides: dict[str, pl.DataType]) -> pl.DataFrame:
    """Rows of dicts as a table, built column by column. A list column whose lists all have one
    length is made from one flat sequence: cell by cell, the lists cost more than the rest of a
    profile's bookkeeping together."""
    columns = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        inner = LIST_COLUMNS.get(name)
        width = len(values[0]) if inner is not None else 0
        if width and all(len(v) == width for v in values):
            flat = pl.Series(name, [item for v in values for item in v], dtype=inner)  # (rows * width,)
            columns[name] = flat.reshape((len(values), width)).cast(pl.List(inner))  # (rows,) of lists
        elif inner is not None:
            columns[name] = pl.Series(name, values, dtype=pl.List(inner))
        else:
            columns[name] = pl.Series(name, values, dtype=overrides.get(name))
    return pl.DataFrame(columns)


def _fingerprint(model: nn.Module, info: dict[str, Any], text: TextSource | None, windows: Windows,
                 configs: list[QuantizerConfig], selected: list[LinearLayer], batch_size: int,
                 top_k: int) -> dict[str, Any]:
    """Everything that can change a figure of a profile; a checkpoint resumes only the same run."""
    weight = next(model.parameters(), None)
    return {
        "model": str(info.get("path", info.get("architecture"))), "model_identity": info.get("identity"),
        "parameters": info.get("parameters"), "dtype": None if weight is None else str(weight.dtype),
        "device": model_device(model).type, "text": None if text is None else text.sha256,
        "windows": windows.sha256, "seqlen": windows.seqlen, "quantizers": [c.label for c in configs],
        "layers": [layer.name for layer in selected], "batch_size": batch_size, "top_k": top_k,
        "kernelscope": versions()["kernelscope"], "torch": str(torch.__version__),
    }


def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"<id {token_id}>"
    return tokenizer.decode([token_id])


def profile(
    model: nn.Module | LoadedModel,
    windows: Windows,
    configs: Sequence[QuantizerConfig],
    *,
    tokenizer=None,
    text: TextSource | None = None,
    layers: str | Sequence[LinearLayer] | None = None,
    include_lm_head: bool = False,
    batch_size: int = 1,
    top_k: int = 10,
    progress: ProgressFn | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    weight_formats: Sequence[QuantizerConfig] = (DEFAULT_WEIGHT_FORMAT,),
) -> ProfileResult:
    """Run ``windows`` through ``model`` and measure the kernel of every selected Linear input.

    ``layers`` is a regular expression over module names, a list from
    :func:`~kernelscope.models.select_linear_layers`, or None for every Linear in the decoder blocks.
    Statistics stream (memory does not grow with the number of windows); Linear layers fed the same
    tensor (q/k/v, gate/up) share one computation. Hooks are removed and the model's training flag
    restored whether the run succeeds or not.

    ``weight_formats`` are the weight quantizers whose kernel each selected layer's weight is measured
    under, from the weights alone (``weights``; none when empty).

    With ``checkpoint`` (a file path) the state is saved after every batch; ``resume`` continues
    from it, giving the same statistics as an uninterrupted run. The caller removes the file once
    the results are safely written.

    Inside a torch.distributed process group (``torchrun``) each process runs its contiguous share
    of the windows, and the statistics are merged exactly before the result is built: every process
    returns the same result as one process running all the windows.
    """
    model, info, own_tokenizer = unpack(model)
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    configs = list(configs)
    if not configs:
        raise ValueError("profile needs at least one quantizer configuration")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batch_size = min(batch_size, len(windows))  # room is made for one batch: never more than there is
    selected = resolve_layers(model, layers, include_lm_head)
    # INT quantizers whose step follows from t and c are counted by the fast pass; every other format
    # element by element, from its own scale rule and grid.
    step_configs = [c for c in configs if c.from_ranges] or [_LAYER_WIDE]
    format_configs = [c for c in configs if not c.from_ranges]
    stats = {layer.name: KernelStats(step_configs, top_k) for layer in selected}
    fstats = {layer.name: FormatStats(format_configs, HISTOGRAM) for layer in selected if format_configs}
    # q/k/v (and gate/up) receive the same tensor object: it is observed once, for the first of them,
    # and the others share that layer's accumulator. `follows` records who shares with whom in the
    # first batch; every later batch must show the same sharing, or a layer would miss a batch.
    shared: dict[str, Any] = {"x": None, "leader": None, "offset": 0}
    follows: dict[str, str | None] = {}
    first_batch = [True]
    # What the hooks measure during a forward pass; summarised for all layers at once after it, and
    # added to the accumulators of the layers of one input shape together.
    pending: list[tuple[str, Measured]] = []
    groups: dict[tuple[str, ...], KernelStatsGroup] = {}

    def observer(name: str, x: torch.Tensor) -> None:
        leader = shared["leader"] if shared["x"] is x else None
        if first_batch[0]:
            follows.setdefault(name, leader)
        if follows.get(name) != leader:
            raise RuntimeError(f"layer {name} shares its input differently from one batch to the next")
        if leader is None:
            pending.append((name, measure(x, step_configs, token_offset=shared["offset"],
                                          seq_len=windows.seqlen, arena=arena)))
            if fstats:
                fstats[name].update(x, windows.seqlen)
            shared["x"], shared["leader"] = x, name

    n = len(windows)
    world = distributed.current()
    mine = world.windows(n)  # every window when alone
    if world.size > 1 and (checkpoint is not None or resume):
        raise KernelscopeError("checkpoints and --resume work in a single process only")
    if world.size > n:
        raise KernelscopeError(f"{world.size} processes need at least as many windows; got {n}")
    fingerprint = _fingerprint(model, info, text, windows, configs, selected, batch_size, top_k)
    start = 0
    if checkpoint is not None and resume:
        start, saved = load_checkpoint(Path(checkpoint), fingerprint)
        device = model_device(model)
        for name, acc in stats.items():
            acc.load_state_dict(saved["int"].get(name, {}), device)
        for name, acc in fstats.items():
            acc.load_state_dict(saved["formats"].get(name, {}))
    # Room for what the hooks keep until a forward pass ends (float64 at most, every layer a leader).
    arena = Arena(sum(measured_nbytes(batch_size, windows.seqlen, layer.in_features, step_configs, 8)
                      for layer in selected), model_device(model))
    started = time.perf_counter()
    with eval_mode(model), LinearInputCapture({layer.name: layer.module for layer in selected}, observer):
        for first in range(max(start, mine.start), mine.stop, batch_size):
            last = min(first + batch_size, mine.stop)
            batch = windows.tokens[first:last]  # (b, T)
            shared["offset"] = first * windows.seqlen
            try:
                forward_windows(model, batch, all_logits=include_lm_head)
                for members, stacked in summarise_groups([m for _, m in pending], step_configs, top_k):
                    names = tuple(pending[i][0] for i in members)
                    if names not in groups:
                        groups[names] = KernelStatsGroup([stats[name] for name in names])
                    groups[names].update(stacked)
            finally:
                shared["x"] = shared["leader"] = None
                pending.clear()
                arena.reset()
            first_batch[0] = False
            done = last
            if checkpoint is not None and done < n:
                leader_of = {name: follows.get(name) or name for name in stats}
                save_checkpoint(Path(checkpoint), fingerprint, done, {
                    "int": {name: stats[leader_of[name]].state_dict() for name in stats},
                    "formats": {name: fstats[leader_of[name]].state_dict() for name in fstats}})
            if progress is not None:
                progress(done - mine.start, len(mine))
    for group in groups.values():
        group.release()
    leaders = [stats[layer.name] for layer in selected if follows.get(layer.name) is None]
    distributed.merge_stats(leaders, model_device(model))
    distributed.merge_format_stats([fstats[name] for name in fstats if follows.get(name) is None],
                                   model_device(model))
    elapsed = time.perf_counter() - started

    owners = [follows.get(layer.name) or layer.name for layer in selected]  # whose accumulator each reads
    for layer, owner in zip(selected, owners, strict=True):
        if stats[owner].empty:
            raise RuntimeError(f"layer {layer.name} never ran; is it used by the model's forward pass?")
    distinct = list(dict.fromkeys(owners))
    computed = dict(zip(distinct, results([stats[owner] for owner in distinct]), strict=True))
    texts: dict[int, str] = {}
    rows = []
    for layer, owner in zip(selected, owners, strict=True):
        res = computed[owner]
        lay = res["layer"]
        positions = [(i // windows.seqlen, i % windows.seqlen) for i in lay["top_token_index"]]
        token_ids = [int(windows.tokens[w, p]) for w, p in positions]
        for t in token_ids:
            if t not in texts:
                texts[t] = _token_text(tokenizer, t)
        base = {
            "layer": layer.name, "block": layer.block, "module_type": layer.module_type,
            "in_features": layer.in_features, "tokens": lay["tokens"], "elements": lay["elements"],
            "nonfinite_elements": lay["nonfinite_elements"],
            "c_ge_t_pairs": lay["c_ge_t_pairs"], "c_ge_t_fraction": lay["c_ge_t_fraction"],
            "abs_max": lay["abs_max"],
            "top_channels": lay["top_channels"], "top_channel_absmax": lay["top_channel_absmax"],
            "top_tokens": [texts[t] for t in token_ids],
            "top_token_ids": token_ids,
            "top_token_positions": [windows.starts[w] + p for w, p in positions],
            "top_token_absmax": lay["top_token_absmax"],
        }
        by_config = dict(zip(step_configs, res["configs"], strict=True))
        if fstats:
            positions = lay["elements"] + lay["nonfinite_elements"]
            by_config |= dict(zip(format_configs, fstats[owner].rows(positions, lay["elements"], QUANTILES),
                                  strict=True))
        rows.extend({**base, "config": cfg.label, **by_config[cfg]} for cfg in configs)
    frame = _table(rows, {"block": pl.Int64, "alpha": pl.Float64,
                          "bound_below_per_token_fraction": pl.Float64,
                          "block_size": pl.Int64, "subnormal_elements": pl.Int64,
                          "subnormal_fraction": pl.Float64, "blocks": pl.Int64, "kernel_blocks": pl.Int64,
                          "block_kernel_fraction": pl.Float64})
    lead = ["layer", "block", "module_type", "quantizer", "bits", "alpha", "config", "elements",
            "kernel_elements", "kernel_fraction"]
    frame = frame.select(lead + [c for c in frame.columns if c not in lead])

    keys = ["config", "quantizer", "bits", "alpha", "format", "block_size"]
    model_level = _rollup(frame, keys)
    by_type = _rollup(frame, ["module_type", *keys])
    tokens = n * windows.seqlen
    summary = {
        **run_context(info, text, windows, "profile"),
        "quantizers": [c.as_dict() | {"label": c.label} for c in configs],
        "layers": {"count": len(selected), "pattern": layers if isinstance(layers, str) else None,
                   "include_lm_head": include_lm_head},
        "settings": {"batch_size": batch_size, "top_k": top_k,
                     "bound_quantiles": f"log histogram, {HISTOGRAM.per_decade} bins a decade "
                                        f"(relative resolution {HISTOGRAM.relative_resolution:.2%})"},
        "model_level": model_level.to_dicts(),
        "by_module_type": by_type.to_dicts(),
        "tokens": tokens,
        "resumed_from_window": start or None,
        "processes": world.size,
        "statistics_backend": elementwise.describe(model_device(model)),
        "seconds": round(elapsed, 3),
        "tokens_per_second": round((n - start) * windows.seqlen / elapsed, 1) if elapsed > 0 else None,
    }
    weights = weight_kernels(model, weight_formats, selected) if weight_formats else None
    if weights is not None:
        summary["weight_formats"] = [c.as_dict() | {"label": c.label} for c in weight_formats]
        summary["weights_model_level"] = weight_rollup(weights).to_dicts()
    return ProfileResult(frame, model_level, by_type, summary, weights)
