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

from kernelscope import element
from kernelscope.capture import LinearInputCapture
from kernelscope.data import TextSource, Windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant import QuantizerConfig
from kernelscope.quant.transforms import IDENTITY, LayerTransform, TransformSpec
from kernelscope.results import write_run
from kernelscope.results.schema import COLUMNS
from kernelscope.runs import distributed
from kernelscope.runs.checkpoint import load_checkpoint, save_checkpoint
from kernelscope.runs.common import resolve_layers, run_context, text_facts, unpack, versions
from kernelscope.runs.forward import eval_mode, forward_windows, model_device
from kernelscope.runs.schemes import Scheme
from kernelscope.runs.target_kernels import (
    STATE_KEY,
    TargetKernels,
    calibrate_targets,
    check_targets,
)
from kernelscope.runs.transforming import ModelTransform, bind_transforms
from kernelscope.runs.weights import DEFAULT_WEIGHT_FORMAT, weight_kernels, weight_rollup
from kernelscope.stats import KernelStats
from kernelscope.stats.accumulator import KernelStatsGroup
from kernelscope.stats.arena import Arena
from kernelscope.stats.histogram import HISTOGRAM
from kernelscope.stats.measure import Measured, measure, measured_nbytes
from kernelscope.stats.summary import summarise_groups
from kernelscope.stats.table import results

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

    def save(self, path: str | Path, *, overwrite: bool = False, **writing: Any) -> Path:
        """Write ``layers.parquet``, ``weights.parquet`` and ``summary.json`` to ``path`` atomically."""
        tables = {"layers": self.layers} | ({} if self.weights is None else {"weights": self.weights})
        return write_run(path, tables, self.summary, overwrite=overwrite, **writing)


Key = tuple[str, str]
"""An accumulator's key: (layer name, transform label)."""


class Observer:
    """What the hooks do during a profile's forward passes: measure each Linear input once in each
    transform's basis (q/k/v and gate/up receive the same tensor object: in a basis they share, it is
    measured for the first of them, and the others share that layer's accumulator), and, once a pass
    is over, add what was measured to the accumulators of the inputs of one shape together."""

    def __init__(self, names: list[str], transforms: list[ModelTransform], configs: list[QuantizerConfig],
                 top_k: int, seq_len: int, arena: Arena, targets: TargetKernels | None = None) -> None:
        self.transforms, self.configs, self.top_k, self.seq_len, self.arena = (
            transforms, configs, top_k, seq_len, arena)
        self.targets = targets or TargetKernels([], {})
        self.stats = {(name, t.label): KernelStats(configs, top_k) for t in transforms for name in names}
        self.follows: dict[Key, Key | None] = {}  # who shares with whom, as the first batch showed
        self.offset = 0  # global index of the batch's first token
        self._first_batch = True
        self._last: list[tuple[torch.Tensor | None, LayerTransform | None, Key | None]] = []
        self._pending: list[tuple[Key, Measured]] = []
        self._groups: dict[tuple[Key, ...], KernelStatsGroup] = {}
        self._forget()

    def __call__(self, name: str, x: torch.Tensor) -> None:
        self.targets(name, x)
        for i, transform in enumerate(self.transforms):
            bound, key = transform.layers[name], (name, transform.label)
            last_x, last_bound, last_key = self._last[i]
            leader = last_key if last_x is x and _same_basis(bound, last_bound) else None
            if self._first_batch:
                self.follows.setdefault(key, leader)
            if self.follows.get(key) != leader:
                raise RuntimeError(f"layer {name} shares its input differently from one batch to the next")
            if leader is None:
                self._pending.append((key, measure(bound.activation(x), self.configs,
                                                   token_offset=self.offset, seq_len=self.seq_len,
                                                   arena=self.arena)))
                self._last[i] = (x, bound, key)

    def end_batch(self, completed: bool) -> None:
        """Add what the pass measured (when it ``completed``) and forget it."""
        self.targets.end_batch(completed)
        try:
            if completed:
                for members, stacked in summarise_groups([m for _, m in self._pending], self.configs,
                                                         self.top_k):
                    keys = tuple(self._pending[i][0] for i in members)
                    if keys not in self._groups:
                        self._groups[keys] = KernelStatsGroup([self.stats[key] for key in keys])
                    self._groups[keys].update(stacked)
                self._first_batch = False
        finally:
            self._forget()
            self._pending.clear()
            self.arena.reset()

    def _forget(self) -> None:
        self._last = [(None, None, None)] * len(self.transforms)

    def owner(self, key: Key) -> Key:
        """The key whose accumulator ``key`` reads (itself, or the first layer sharing its input)."""
        return self.follows.get(key) or key

    def merge(self, device: torch.device) -> None:
        """Make every process's statistics and target counts the merge of all processes'."""
        distributed.merge_stats(self.leaders(), device)
        distributed.merge_counts(self.targets.kernel, device)

    def leaders(self) -> list[KernelStats]:
        self.release()
        return [acc for key, acc in self.stats.items() if self.follows.get(key) is None]

    def release(self) -> None:
        for group in self._groups.values():
            group.release()

    def state(self) -> dict[Key, dict]:
        """Every accumulator's state as a checkpoint keeps it (tensors only), and the targets' counts."""
        return ({key: self.stats[self.owner(key)].state_dict() for key in self.stats}
                | {STATE_KEY: self.targets.state()})

    def load(self, state: dict[Key, dict], device: torch.device) -> None:
        for key, acc in self.stats.items():
            acc.load_state_dict(state.get(key, {}), device)
        self.targets.load(state.get(STATE_KEY, {}), device)


def _same_basis(a: LayerTransform, b: LayerTransform | None) -> bool:
    """Whether ``a`` and ``b`` map an input alike: the same bound object, or both the identity."""
    return b is not None and (a is b or (a.is_identity and b.is_identity))


def _fingerprint(model: nn.Module, info: dict[str, Any], text: TextSource | None, windows: Windows,
                 configs: list[QuantizerConfig], selected: list[LinearLayer], batch_size: int,
                 top_k: int, transforms: list[ModelTransform], calibration: Windows | None,
                 targets: TargetKernels) -> dict[str, Any]:
    """Everything that can change a figure of a profile; a checkpoint resumes only the same run."""
    weight = next(model.parameters(), None)
    return {
        "model": str(info.get("path", info.get("architecture"))), "model_identity": info.get("identity"),
        "parameters": info.get("parameters"), "dtype": None if weight is None else str(weight.dtype),
        "device": model_device(model).type, "text": None if text is None else text.sha256,
        "windows": windows.sha256, "seqlen": windows.seqlen,
        "quantizers": [[c.label, c.alpha, c.block_size] for c in configs],
        "targets": [s.name for s in targets.schemes],
        "layers": [layer.name for layer in selected], "batch_size": batch_size, "top_k": top_k,
        "transforms": [[t.label, t.spec.seed] for t in transforms],
        "calibration": None if calibration is None else calibration.sha256,
        "kernelscope": versions()["kernelscope"], "torch": str(torch.__version__),
    }


def _run_batches(model: nn.Module, windows: Windows, observer: Observer, selected: list[LinearLayer],
                 mine: range, start: int, batch_size: int, include_lm_head: bool, save: Callable[[int], None],
                 progress: ProgressFn | None) -> None:
    """The forward passes of this process's windows from ``start``, the observer on every selected
    Linear's input; ``save(done)`` after each batch (a checkpoint)."""
    with eval_mode(model), LinearInputCapture({layer.name: layer.module for layer in selected}, observer):
        for first in range(max(start, mine.start), mine.stop, batch_size):
            last = min(first + batch_size, mine.stop)
            observer.offset = first * windows.seqlen
            completed = False
            try:
                forward_windows(model, windows.tokens[first:last], all_logits=include_lm_head)  # (b, T)
                completed = True
            finally:
                observer.end_batch(completed)
            save(last)
            if progress is not None:
                progress(last - mine.start, len(mine))


def profile(
    model: nn.Module | LoadedModel, windows: Windows, configs: Sequence[QuantizerConfig], *,
    tokenizer=None, text: TextSource | None = None, layers: str | Sequence[LinearLayer] | None = None,
    include_lm_head: bool = False, batch_size: int = 1, top_k: int = 10, progress: ProgressFn | None = None,
    checkpoint: str | Path | None = None, resume: bool = False,
    weight_formats: Sequence[QuantizerConfig] = (DEFAULT_WEIGHT_FORMAT,),
    transforms: Sequence[TransformSpec | ModelTransform] = (IDENTITY,),
    calibration: Windows | None = None, calibration_text: TextSource | None = None,
    targets: Sequence[Scheme] = (),
) -> ProfileResult:
    """Run ``windows`` through ``model`` and measure the kernel of every selected Linear input.

    ``layers`` is a regular expression over module names, a list from
    :func:`~kernelscope.models.select_linear_layers`, or None for every Linear in the decoder blocks.
    Statistics stream (memory does not grow with the number of windows); Linear layers fed the same
    tensor (q/k/v, gate/up) share one computation. Hooks are removed and the model's training flag
    restored whether the run succeeds or not.

    ``weight_formats``: the quantizers each selected layer's weight kernel is measured under (or none).

    ``transforms`` are the bases every configuration is measured in, in the same forward passes: each
    input ``x`` is counted as ``T(x)`` and each weight as its transformed counterpart (every row names its
    ``transform``). Calibrated ones (SmoothQuant) are calibrated on ``calibration`` first (windows of
    ``calibration_text``, which the summary records).

    ``targets`` (schemes ``LIBRARY:NAME``): each input's kernel in that library's arithmetic too (static
    scales calibrated on ``calibration`` first), in rows of their own with the kernel only.

    With ``checkpoint`` (a file path) the state is saved after every batch; ``resume`` continues
    from it, giving the same statistics as an uninterrupted run. The caller removes the file once
    the results are safely written.

    Inside a torch.distributed process group (``torchrun``) each process runs its contiguous share
    of the windows, and the statistics are merged exactly before the result is built: every process
    returns the same result as one process running all the windows.
    """
    model, info, own_tokenizer = unpack(model)
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    configs, batch_size = _checked(configs, targets, batch_size, len(windows))
    selected = resolve_layers(model, layers, include_lm_head)
    world, mine = _share(len(windows), checkpoint is not None or resume)
    device = model_device(model)
    bound, calibrated = bind_transforms(model, selected, transforms, calibration, batch_size=batch_size)
    counter = _target_kernels(model, targets, selected, bound, calibration, batch_size)
    observer = _observer(selected, bound, configs, top_k, windows.seqlen, batch_size, device, counter)
    calibration = calibration if calibrated or counter.static else None
    fingerprint = _fingerprint(model, info, text, windows, configs, selected, batch_size, top_k, bound,
                               calibration, counter)
    start, save = _checkpointing(checkpoint, resume, fingerprint, observer, device, len(windows))
    started = time.perf_counter()
    _run_batches(model, windows, observer, selected, mine, start, batch_size, include_lm_head, save, progress)
    observer.merge(device)
    elapsed = time.perf_counter() - started
    result = _rolled_up(_layer_table(selected, observer, configs, windows, tokenizer))
    result.summary = _summary(result, info, text, windows, configs, selected, layers, include_lm_head,
                              batch_size, top_k, start, world, device, elapsed)
    _add_transforms_and_weights(result, model, selected, bound, calibration, calibration_text, weight_formats)
    result.summary |= counter.summary()
    return result


def _rolled_up(frame: pl.DataFrame) -> ProfileResult:
    """A result of the layer table ``frame`` and its roll-ups (the model, each module type)."""
    by_type = _rollup(frame, ["module_type", *ROLLUP_KEYS])
    return ProfileResult(frame, _rollup(frame, ROLLUP_KEYS), by_type, {})


def _checked(configs: Sequence[QuantizerConfig], targets: Sequence[Scheme], batch_size: int,
             n: int) -> tuple[list[QuantizerConfig], int]:
    """The configurations as a list and the batch size, refused when there is nothing to measure or no
    window to a batch; a batch is never made larger than the ``n`` windows there are (room is made for
    one batch)."""
    configs = list(configs)
    if not configs and not targets:
        raise ValueError("profile needs at least one quantizer configuration")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return configs, min(batch_size, n)


def _share(n: int, checkpointing: bool) -> tuple[distributed.World, range]:
    """The process group and this process's contiguous share of the ``n`` windows (every window when
    alone); checkpoints are refused in a group, and a group larger than the windows."""
    world = distributed.current()
    mine = world.windows(n)  # every window when alone
    if world.size > 1 and checkpointing:
        raise KernelscopeError("checkpoints and --resume work in a single process only")
    if world.size > n:
        raise KernelscopeError(f"{world.size} processes need at least as many windows; got {n}")
    return world, mine


def _target_kernels(model: nn.Module, targets: Sequence[Scheme], selected: list[LinearLayer],
                    bound: list[ModelTransform], calibration: Windows | None,
                    batch_size: int) -> TargetKernels:
    """The counter of the targets' kernels, their static scales calibrated first."""
    check_targets(targets, bound)
    scales, static = calibrate_targets(model, targets, selected, calibration, batch_size=batch_size)
    return TargetKernels(targets, scales, static)


def _observer(selected: list[LinearLayer], bound: list[ModelTransform], configs: list[QuantizerConfig],
              top_k: int, seqlen: int, batch_size: int, device: torch.device,
              targets: TargetKernels) -> Observer:
    """The observer of a profile's passes, with room for what the hooks keep until a forward pass ends
    (every layer a leader in every basis)."""
    arena = Arena(len(bound) * sum(measured_nbytes(batch_size, seqlen, layer.in_features, configs)
                                   for layer in selected), device)
    return Observer([layer.name for layer in selected], bound, configs, top_k, seqlen, arena, targets)


def _checkpointing(checkpoint: str | Path | None, resume: bool, fingerprint: dict[str, Any],
                   observer: Observer, device: torch.device, n: int) -> tuple[int, Callable[[int], None]]:
    """The window to start from (0, or where the checkpoint left off with ``resume``, its state loaded
    into ``observer``) and what saves the state after each batch (nothing without a checkpoint, or once
    all ``n`` windows are done)."""
    start = 0
    if checkpoint is not None and resume:
        start, saved = load_checkpoint(Path(checkpoint), fingerprint)
        observer.load(saved, device)

    def save(done: int) -> None:
        if checkpoint is not None and done < n:
            save_checkpoint(Path(checkpoint), fingerprint, done, observer.state())

    return start, save


def _add_transforms_and_weights(result: ProfileResult, model: nn.Module, selected: list[LinearLayer],
                                bound: list[ModelTransform], calibration: Windows | None,
                                calibration_text: TextSource | None,
                                weight_formats: Sequence[QuantizerConfig]) -> None:
    """Complete ``result``: its transforms and calibration in the summary, and, for each of
    ``weight_formats``, the kernel of each selected layer's weight (table and model-level roll-up)."""
    result.summary["transforms"] = [t.describe() for t in bound]
    result.summary["calibration"] = None if calibration is None else {
        "text": text_facts(calibration_text), "windows": calibration.as_dict()}
    if weight_formats:
        result.weights = weight_kernels(model, weight_formats, selected, transforms=bound)
        result.summary["weight_formats"] = [c.as_dict() | {"label": c.label} for c in weight_formats]
        result.summary["weights_model_level"] = weight_rollup(result.weights).to_dicts()


def _sum_or_null(column: str) -> pl.Expr:
    """The sum of a count column, null where no row has it (a figure the quantizer does not have)."""
    col = pl.col(column)
    return pl.when(col.null_count() == pl.len()).then(None).otherwise(col.sum()).alias(column)


ROLLUP_KEYS = ["transform", "config", "quantizer", "bits", "alpha", "format", "block_size"]


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
            (pl.col("c_ge_t_pairs") / (pl.col("elements") + pl.col("nonfinite_elements")))
            .alias("c_ge_t_fraction"),
            (pl.col("subnormal_elements") / pl.col("elements")).alias("subnormal_fraction"),
            (pl.col("kernel_blocks") / pl.col("blocks")).alias("block_kernel_fraction"),
        )
    )


LEAD_COLUMNS = ["layer", "block", "module_type", "transform", "quantizer", "bits", "alpha", "config",
                "elements", "kernel_elements", "kernel_fraction"]


def _table(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Rows of dicts as a table, built column by column in the declared types. A list column whose
    lists all have one length is made from one flat sequence: cell by cell, the lists cost more than
    the rest of a profile's bookkeeping together."""
    columns = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        dtype = COLUMNS[name].dtype if name in COLUMNS else None
        width = len(values[0]) if isinstance(dtype, pl.List) else 0
        if width and all(len(v) == width for v in values):
            flat = pl.Series(name, [item for v in values for item in v], dtype=dtype.inner)  # (rows * width,)
            columns[name] = flat.reshape((len(values), width)).cast(dtype)  # (rows,) of lists
        else:
            columns[name] = pl.Series(name, values, dtype=dtype)
    return pl.DataFrame(columns)


def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"<id {token_id}>"
    return tokenizer.decode([token_id])


def _layer_table(selected: list[LinearLayer], observer: Observer, configs: list[QuantizerConfig],
                 windows: Windows, tokenizer) -> pl.DataFrame:
    """One row per transform × layer × configuration, from each accumulator (or the one it shares)."""
    keys = [(layer, (layer.name, t.label)) for t in observer.transforms for layer in selected]
    depth = {layer.name: i for i, layer in enumerate(selected)}  # capture order along the model
    owners = [observer.owner(key) for _, key in keys]
    for (layer, _), owner in zip(keys, owners, strict=True):
        if observer.stats[owner].empty:
            raise RuntimeError(f"layer {layer.name} never ran; is it used by the model's forward pass?")
    distinct = list(dict.fromkeys(owners))
    computed = dict(zip(distinct, results([observer.stats[owner] for owner in distinct]), strict=True))
    texts: dict[int, str] = {}
    counts = observer.targets.counts()
    rows = []
    for (layer, (_, transform)), owner in zip(keys, owners, strict=True):
        lay = computed[owner]["layer"]
        positions = [(i // windows.seqlen, i % windows.seqlen) for i in lay["top_token_index"]]
        token_ids = [int(windows.tokens[w, p]) for w, p in positions]
        for t in token_ids:
            if t not in texts:
                texts[t] = _token_text(tokenizer, t)
        base = {
            "layer": layer.name, "block": layer.block, "module_type": layer.module_type,
            "transform": transform, "depth": depth[layer.name],
            "in_features": layer.in_features, "tokens": lay["tokens"], "elements": lay["elements"],
            "nonfinite_elements": lay["nonfinite_elements"],
            "c_ge_t_pairs": lay["c_ge_t_pairs"], "c_ge_t_fraction": lay["c_ge_t_fraction"],
            "abs_max": lay["abs_max"],
            "top_channels": lay["top_channels"], "top_channel_absmax": lay["top_channel_absmax"],
            "top_tokens": [texts[t] for t in token_ids],
            "top_token_ids": token_ids,
            "top_token_positions": [windows.starts[w] + p for w, p in positions],
            "top_token_window_positions": [p for _, p in positions],  # 0: the window's first token
            "top_token_absmax": lay["top_token_absmax"],
        }
        rows.extend({**base, "config": cfg.label, **row}
                    for cfg, row in zip(configs, computed[owner]["configs"], strict=True))
        rows.extend({**base, **row} for row in observer.targets.rows(layer.name, lay["elements"], counts))
    frame = _table(rows)
    return frame.select(LEAD_COLUMNS + [c for c in frame.columns if c not in LEAD_COLUMNS])


def _summary(result: ProfileResult, info: dict, text: TextSource | None, windows: Windows,
             configs: list[QuantizerConfig], selected: list[LinearLayer], layers, include_lm_head: bool,
             batch_size: int, top_k: int, start: int, world: distributed.World, device: torch.device,
             elapsed: float) -> dict[str, Any]:
    n = len(windows)
    return {
        **run_context(info, text, windows, "profile"),
        "quantizers": [c.as_dict() | {"label": c.label} for c in configs],
        "layers": {"count": len(selected), "pattern": layers if isinstance(layers, str) else None,
                   "include_lm_head": include_lm_head},
        "settings": {"batch_size": batch_size, "top_k": top_k,
                     "bound_quantiles": f"log histogram, {HISTOGRAM.per_decade} bins a decade "
                                        f"(relative resolution {HISTOGRAM.relative_resolution:.2%})"},
        "model_level": result.model_level.to_dicts(),
        "by_module_type": result.by_module_type.to_dicts(),
        "tokens": n * windows.seqlen,
        "resumed_from_window": start or None,
        "processes": world.size,
        "statistics_backend": element.describe(device),
        "seconds": round(elapsed, 3),
        "tokens_per_second": round((n - start) * windows.seqlen / elapsed, 1) if elapsed > 0 else None,
    }


def measured_kernels(model: nn.Module, windows: Windows, configs: Sequence[QuantizerConfig],
                     layers: Sequence[LinearLayer], transforms: Sequence[ModelTransform], *,
                     tokenizer: Any = None, batch_size: int = 1,
                     progress: ProgressFn | None = None) -> dict[str, list[dict[str, Any]]]:
    """The model-level kernel of each configuration on the full-precision inputs, in each transform's
    basis (by label): one profile, every basis in the same forward passes."""
    level = profile(model, windows, configs, tokenizer=tokenizer, layers=list(layers), batch_size=batch_size,
                    progress=progress, weight_formats=(), transforms=transforms).model_level
    keep = ["transform", "config", "quantizer", "bits", "alpha", "kernel_elements", "elements",
            "kernel_fraction"]
    return {t.label: level.filter(pl.col("transform") == t.label).select(keep).to_dicts() for t in transforms}
