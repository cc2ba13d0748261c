"""``evaluate``: perplexity of a model under several schemes, one model load, one tokenization.

Protocol (SmoothQuant, AWQ, GPTQ, OmniQuant): the text is tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens, the tail dropped; each window is one forward pass; the
perplexity is ``exp`` of the mean negative log-likelihood of every token predicted from the tokens
before it in its window (``seqlen - 1`` per window).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from kernelscope.data import TextSource, Windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant import targets
from kernelscope.quant.modes import Mode
from kernelscope.quant.transforms import IDENTITY, NONE, TransformSpec
from kernelscope.results import write_run
from kernelscope.runs.common import (
    StageProgress,
    TableResult,
    resolve_layers,
    run_context,
    stage_callback,
    text_facts,
    unpack,
)
from kernelscope.runs.fakequant import SchemeApplied, covered_layers
from kernelscope.runs.forward import attention, eval_mode, model_device
from kernelscope.runs.schemes import Scheme
from kernelscope.runs.sqnr import SqnrMeasurements
from kernelscope.runs.transforming import (
    ModelTransform,
    TransformBinder,
    calibration_ranges,
    identity_transform,
)
from kernelscope.stats.uncertainty import METHOD, paired_difference, perplexity_interval


def protocol_text(windows: Windows) -> str:
    return (
        f"text tokenized once; {len(windows)} non-overlapping {windows.seqlen}-token windows "
        f"({windows.selection}), tail dropped; perplexity = exp(mean NLL over "
        f"{len(windows) * (windows.seqlen - 1):,} predicted tokens, {windows.seqlen - 1} per window) "
        "— the WikiText-2 protocol of SmoothQuant, AWQ, GPTQ and OmniQuant"
    )


LogitsHook = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``hook(first_window, logits (b, T, V), tokens (b, T))``, called after each batch's forward pass."""


def nll_pass(
    model: nn.Module,
    windows: Windows,
    *,
    batch_size: int = 1,
    after_batch: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_logits: LogitsHook | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed NLL of each window, ``(W,)`` float64 on the CPU, and the tokens each window predicts.

    Token NLLs are computed in float32 and summed per window in float64; the run's mean NLL is
    ``sums.sum() / (W · tokens)``. ``on_logits`` sees every batch's logits (e.g. to compare them with
    a reference) without a second pass.
    """
    device = model_device(model)
    sums = []
    n = len(windows)
    for first in range(0, n, batch_size):
        batch = windows.tokens[first : first + batch_size].to(device)  # (b, T)
        try:
            logits = model(input_ids=batch, use_cache=False).logits  # (b, T, V)
        finally:
            if after_batch is not None:
                after_batch()
        vocab = logits.shape[-1]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),  # (b*(T-1), V)
                              batch[:, 1:].reshape(-1), reduction="none")
        sums.append(nll.view(batch.shape[0], -1).double().sum(dim=1))  # (b,)
        if on_logits is not None:
            on_logits(first, logits, batch)
        del logits
        if progress is not None:
            progress(min(first + batch_size, n), n)
    return torch.cat(sums).cpu(), windows.seqlen - 1


def perplexity_of(mean_nll: float) -> float:
    """``exp(mean NLL)``: infinite past float range, NaN for a NaN mean."""
    if math.isnan(mean_nll):
        return math.nan
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def run_scheme(
    model: nn.Module,
    windows: Windows,
    scheme: Scheme,
    layers: list[LinearLayer],
    *,
    transform: ModelTransform | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    on_logits: LogitsHook | None = None,
    calibration: dict[str, targets.Calibration] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` under ``scheme`` on ``windows``, with the activation kernel it caused,
    the mean NLL of every window (``window_nll``) and the bootstrap interval of the perplexity.

    ``transform`` (bound to ``layers``; default none) changes the basis the scheme quantizes in; it
    must include the scheme's own transform (see :func:`evaluate`). ``calibration`` holds the static
    scales of a target that has them (:func:`calibrate_target`).
    """
    started = time.perf_counter()
    transform = transform or identity_transform(layers)
    applied = SchemeApplied(layers, scheme, transform.layers, seq_len=windows.seqlen, calibration=calibration)
    with eval_mode(model), applied:
        sums, per_window = nll_pass(model, windows, batch_size=batch_size, after_batch=applied.end_batch,
                                    progress=progress, on_logits=on_logits)
    seconds = time.perf_counter() - started
    kernel = int(applied.kernel) if applied.kernel is not None else None
    elements = int(applied.elements) if applied.elements is not None else None
    tokens = len(windows) * per_window
    nll = float(sums.sum())
    mean = nll / tokens
    window_nll = (sums / per_window).tolist()
    ci = perplexity_interval(window_nll)
    return {
        **scheme.describe(),
        **transform.describe(),
        "perplexity": perplexity_of(mean),
        "perplexity_ci_low": ci[0] if ci else None,
        "perplexity_ci_high": ci[1] if ci else None,
        "finite": math.isfinite(nll),  # False: the model produced NaN/Inf logits under this scheme
        "nll": mean,
        "window_nll": window_nll,
        "tokens": tokens,
        "windows": len(windows),
        "kernel_elements": kernel,
        "elements": elements,
        "kernel_fraction": kernel / elements if kernel is not None and elements else None,
        "seconds": round(seconds, 3),
    }


def compare(row: dict[str, Any], reference: dict[str, Any], name: str = "fp") -> dict[str, Any]:
    """The paired difference of ``row`` from ``reference`` (same windows) as row fields:
    ``delta_nll`` (log perplexity), ``change_pct`` and their intervals, and ``vs_fp`` in words."""
    diff = paired_difference(row["window_nll"], reference["window_nll"], reference=name,
                             delta=row["nll"] - reference["nll"])
    fields = diff.as_dict()
    fields[f"vs_{name}"] = fields.pop("verdict")
    return fields


def fp_references(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """The fp row each row is compared with, by transform: the first fp row of its own transform, or
    of none (the model itself) where its transform has none; None without an fp row."""
    fp: dict[str, dict[str, Any]] = {}
    for r in rows:  # the first fp row of each transform
        if r["mode"] == Mode.FP:
            fp.setdefault(r.get("transform", NONE), r)
    if not fp:
        return None
    default = fp.get(NONE, next(iter(fp.values())))
    return {r.get("transform", NONE): fp.get(r.get("transform", NONE), default) for r in rows}


def with_comparisons(rows: list[dict[str, Any]], reference: dict[str, Any] | dict[str, dict] | None,
                     ) -> list[dict[str, Any]]:
    """Each row with its paired difference from ``reference`` (one row; or, from
    :func:`fp_references`, one per transform), None fields for a reference itself or without one."""
    empty = dict.fromkeys(("delta_nll", "delta_nll_ci_low", "delta_nll_ci_high", "change_pct",
                           "change_pct_ci_low", "change_pct_ci_high", "vs_fp"))

    def ref_of(row):
        if reference is None or "window_nll" in reference:
            return reference
        return reference.get(row.get("transform", NONE))

    return [row | (compare(row, ref_of(row)) if ref_of(row) is not None and row is not ref_of(row) else empty)
            for row in rows]


def split_ignored(selected: list[LinearLayer], ignore: str | Sequence[str] | None,
                  ) -> tuple[list[LinearLayer], list[LinearLayer]]:
    """``(quantized, ignored)``: the selected layers without, and with, the names ``ignore`` gives
    (a regular expression, ``re.search``; or exact names, which may include unselected ones)."""
    if ignore is None:
        return selected, []
    if isinstance(ignore, str):
        try:
            regex = re.compile(ignore)
        except re.error as exc:
            raise KernelscopeError(f"--ignore {ignore!r} is not a valid regular expression: {exc}") from None
        hit = {layer.name for layer in selected if regex.search(layer.name)}
        if not hit:
            raise KernelscopeError(f"--ignore {ignore!r} matches none of the {len(selected)} selected "
                                   "layers; list them with `kernelscope layers MODEL`")
    else:
        hit = set(ignore)
    return [lay for lay in selected if lay.name not in hit], [lay for lay in selected if lay.name in hit]


@dataclass
class EvalResult(TableResult):
    """One row per scheme (``table``) and the JSON summary (``summary.json``); with ``sqnr``, one row per
    quantizing scheme × transform × layer of the layers' output SQNR (``sqnr.parquet``)."""

    TABLE: ClassVar[str] = "eval"
    sqnr: pl.DataFrame | None = None

    def save(self, path: str | Path, *, overwrite: bool = False, **writing: Any) -> Path:
        tables = {self.TABLE: self.table} | ({} if self.sqnr is None else {"sqnr": self.sqnr})
        return write_run(path, tables, self.summary, overwrite=overwrite, **writing)


def scheme_transform(scheme: Scheme, transform: TransformSpec) -> TransformSpec:
    """The basis ``scheme`` quantizes in under ``transform``: its own transform (SmoothQuant's), then
    ``transform``. Raises KernelscopeError where a step would apply twice."""
    try:
        return scheme.transform.then(transform)
    except ValueError as exc:
        raise KernelscopeError(f"scheme {scheme.name} with transform {transform.label}: {exc}") from None


def calibrate_target(model: nn.Module, scheme: Scheme, layers: Sequence[LinearLayer],
                     transform: ModelTransform, windows: Windows | None, *, batch_size: int = 1
                     ) -> tuple[dict[str, targets.Calibration], dict[str, Any]]:
    """The static scales of ``scheme``'s target on each layer, from the min and max of the layer's input
    (in ``transform``'s basis) over the calibration ``windows``, the model in full precision, or the
    abs-max the transform's last step calibrated with it (ModelOpt's smoothquant); and what the summary
    records of them. Nothing for a scheme without static scales."""
    if not scheme.needs_calibration:
        return {}, {}
    if windows is None:
        raise KernelscopeError(f"{scheme.name} calibrates static activation scales: it needs calibration "
                               "windows (--calib-dataset, --calib-nsamples)")
    args = scheme.target.input_activations
    with attention(model, args.arithmetic.calibration_attention):
        ranges = calibration_ranges(model, layers, windows, transform.layers, batch_size=batch_size)
    dtypes = {layer.name: layer.module.weight.dtype for layer in layers}
    scales = {name: targets.calibrate(lo, hi, args, dtypes[name]) for name, (lo, hi) in ranges.items()}
    for name, bound in transform.layers.items():  # a step that calibrates the amax itself (smoothquant)
        if name in scales and bound.steps and bound.steps[-1].input_amax is not None:
            scales[name] = targets.Calibration(bound.steps[-1].input_amax)
    key = "amax" if args.arithmetic is targets.Arithmetic.MODELOPT else "scale"
    facts = {name: {"min": float(lo), "max": float(hi),
                    key: None if scales[name].scale is None else float(scales[name].scale.float().max()),
                    "global_scale": None if scales[name].global_scale is None
                    else float(scales[name].global_scale)}
             for name, (lo, hi) in ranges.items()}
    return scales, {"observer": args.observer or "minmax", "layers": facts}


def scheme_layers(net: nn.Module, schemes: Sequence[Scheme], selected: list[LinearLayer],
                  ignored: list[LinearLayer], transforms: Sequence[TransformSpec],
                  ) -> dict[str, list[LinearLayer]]:
    """The layers each scheme quantizes (a recipe's own, or the selected ones), less the ``ignored``;
    each checked against the scheme (groups that must divide a layer's inputs) before any pass."""
    ignored_names = {layer.name for layer in ignored}
    covers = {scheme.name: [layer for layer in covered_layers(net, scheme, selected)
                            if layer.name not in ignored_names] for scheme in schemes}
    present = [name for name, _ in net.named_modules()]
    for scheme in schemes:
        scheme.check_widths(covers[scheme.name])
        scheme.check_fused(covers[scheme.name], present, [layer.name for layer in selected])
        own_basis = scheme.target is not None and (scheme.target.coverage is not None
                                                   or not scheme.transform.is_identity)
        if own_basis and not all(t.is_identity for t in transforms):
            raise KernelscopeError(f"{scheme.name} deploys in the model's own basis; give it without "
                                   "--transform")
    return covers


def evaluate(
    model: nn.Module | LoadedModel,
    windows: Windows,
    schemes: Sequence[Scheme],
    *,
    text: TextSource | None = None,
    layers: str | Sequence[LinearLayer] | None = None,
    transforms: Sequence[TransformSpec] = (IDENTITY,),
    calibration: Windows | None = None,
    calibration_text: TextSource | None = None,
    ignore: str | Sequence[str] | None = None,
    ignore_source: str | None = None,
    batch_size: int = 1,
    progress: StageProgress | None = None,
    sqnr: bool = False,
) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` under each scheme and each transform, scheme by scheme.

    Activations and weights of the selected Linear layers (default: every Linear in the decoder
    blocks; ``lm_head`` stays in full precision, as in SmoothQuant) are treated as each scheme says,
    in the basis of each transform (``none`` the identity): the scheme's own transform (SmoothQuant
    schemes) first, then the one given; except the layers ``ignore`` names (a regular expression over
    module names, or the names themselves), which stay in full precision: a plan from ``advise``
    re-measured. Calibrated transforms need ``calibration`` windows (from text other than the
    evaluation text). Each row carries its per-window NLLs and a bootstrap interval; with an ``fp``
    scheme among them, every other row its paired difference from fp on the same windows (the fp
    row of the same transform where there is one). ``sqnr``: each layer's output SQNR too (sqnr.py).
    """
    net, info, _ = unpack(model)
    _check_evaluate(schemes, transforms, sqnr)
    selected, ignored = split_ignored(resolve_layers(net, layers), ignore)
    covers = scheme_layers(net, schemes, selected, ignored, transforms)
    pairs = [(scheme, scheme_transform(scheme, t)) for scheme in schemes for t in transforms]
    binder = TransformBinder(net, selected, calibration, batch_size=batch_size)
    for _, spec in pairs:  # every width checked and every calibration done before the first evaluation
        binder.bind(spec)
    errors = SqnrMeasurements() if sqnr else None
    rows, scales = _evaluate_pairs(net, windows, pairs, covers, binder, calibration, errors,
                                   labelled=len(transforms) > 1, batch_size=batch_size, progress=progress)
    rows = with_comparisons(rows, fp_references(rows))
    table = pl.DataFrame(rows, infer_schema_length=None)
    summary = {
        **run_context(info, text, windows, "eval"),
        "protocol": protocol_text(windows),
        "uncertainty": METHOD,
        "results": rows,
        "layers": {"count": len(selected), "pattern": layers if isinstance(layers, str) else None,
                   "lm_head": "full precision", "full_precision": [layer.name for layer in ignored],
                   "ignore": ignore_source or (ignore if isinstance(ignore, str) else None)},
        "transforms": transforms_facts(transforms),
        "calibration": calibration_facts(calibration, calibration_text, binder.calibrated or bool(scales)),
        "static_scales": scales or None,
        "sqnr": errors.summary() if errors is not None else None,
        "settings": {"batch_size": batch_size},
    }
    return EvalResult(table, summary, errors.table() if errors is not None else None)


def _check_evaluate(schemes: Sequence[Scheme], transforms: Sequence[TransformSpec], sqnr: bool) -> None:
    """Refuse a run with nothing to evaluate, or an SQNR with no quantizing scheme to measure it under."""
    if not schemes:
        raise ValueError("evaluate needs at least one scheme")
    if not transforms:
        raise ValueError("evaluate needs at least one transform (IDENTITY for none)")
    if sqnr and not any(scheme.mode.quantizes for scheme in schemes):
        raise ValueError("the SQNR measures the error of a quantizing scheme; fp quantizes nothing")


def _evaluate_pairs(net: nn.Module, windows: Windows, pairs: Sequence[tuple[Scheme, TransformSpec]],
                    covers: dict[str, list[LinearLayer]], binder: TransformBinder,
                    calibration: Windows | None, errors: SqnrMeasurements | None, *, labelled: bool,
                    batch_size: int,
                    progress: StageProgress | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The row of each scheme under each transform (a target's static scales calibrated first), and the
    scales by pass; with ``errors``, each quantizing scheme's layers' output SQNR measured there too."""
    rows, scales = [], {}
    for scheme, spec in pairs:
        stage = f"{scheme.name}, {spec.label}" if labelled else scheme.name
        bound, covered = binder.bind(spec), covers[scheme.name]
        calibrated, facts = calibrate_target(net, scheme, covered, bound, calibration, batch_size=batch_size)
        if facts:
            scales[f"{scheme.name}, {spec.label}"] = facts
        rows.append(run_scheme(net, windows, scheme, covered, transform=bound, calibration=calibrated,
                               batch_size=batch_size, progress=stage_callback(progress, stage)))
        if errors is not None and scheme.mode.quantizes:
            errors.measure(net, windows, scheme, covered, transform=bound, calibration=calibrated,
                           batch_size=batch_size, progress=stage_callback(progress, f"{stage}: output SQNR"))
    return rows, scales


def calibration_facts(calibration: Windows | None, calibration_text: TextSource | None,
                      used: bool) -> dict[str, Any] | None:
    """What a summary says about the calibration windows: their text and selection, or None when there
    were none or nothing in the run was calibrated on them (``used`` false)."""
    if calibration is None or not used:
        return None
    return {"text": text_facts(calibration_text), "windows": calibration.as_dict()}


def transforms_facts(transforms: Sequence[TransformSpec]) -> dict[str, Any]:
    """What a summary says about the transforms of a run and how they were applied."""
    return {
        "given": [t.label for t in transforms],
        "seed": next((t.seed for t in transforms if t.seed is not None), None),
        "basis": "each quantizer acts on T(x); schemes that quantize weights use the weight in that basis "
                 "(W·A^-T), quantized there; schemes with full-precision weights map the activation back "
                 "(T^-1) and keep the layer's own weight",
    }
