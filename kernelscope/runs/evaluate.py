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
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from kernelscope.capture import LinearInputCapture
from kernelscope.data import TextSource, Windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant import smoothing_factors
from kernelscope.runs.common import (
    StageProgress,
    TableResult,
    resolve_layers,
    run_context,
    stage_callback,
    text_facts,
    unpack,
)
from kernelscope.runs.fakequant import SchemeApplied, weight_out_in
from kernelscope.runs.forward import eval_mode, forward_windows, model_device
from kernelscope.runs.schemes import Scheme
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


def calibrate_smoothing(
    model: nn.Module, layers: list[LinearLayer], windows: Windows, alpha: float, *, batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """SmoothQuant factors per layer from the channel maxima of its input over ``windows``."""
    act_max: dict[str, torch.Tensor] = {}

    def observer(name: str, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # (I,)
        act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)

    with eval_mode(model), LinearInputCapture({layer.name: layer.module for layer in layers}, observer):
        for first in range(0, len(windows), batch_size):
            forward_windows(model, windows.tokens[first : first + batch_size])
    factors = {}
    for layer in layers:
        w_max = weight_out_in(layer.module).detach().abs().amax(dim=0).float()  # (I,)
        factors[layer.name] = smoothing_factors(act_max[layer.name].to(w_max.device), w_max, alpha)
    return factors


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
    smoothing: dict[str, torch.Tensor] | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    on_logits: LogitsHook | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` under ``scheme`` on ``windows``, with the activation kernel it caused,
    the mean NLL of every window (``window_nll``) and the bootstrap interval of the perplexity."""
    started = time.perf_counter()
    applied = SchemeApplied(layers, scheme, smoothing, seq_len=windows.seqlen)
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


def with_comparisons(rows: list[dict[str, Any]], reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each row with its paired difference from ``reference`` (None fields for the reference itself,
    or for every row when there is no reference)."""
    empty = dict.fromkeys(("delta_nll", "delta_nll_ci_low", "delta_nll_ci_high", "change_pct",
                           "change_pct_ci_low", "change_pct_ci_high", "vs_fp"))
    return [row | (compare(row, reference) if reference is not None and row is not reference else empty)
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
            raise KernelscopeError(f"--ignore {ignore!r} matches none of the {len(selected)} selected layers; "
                                   "list them with `kernelscope layers MODEL`")
    else:
        hit = set(ignore)
    return [lay for lay in selected if lay.name not in hit], [lay for lay in selected if lay.name in hit]


class EvalResult(TableResult):
    """One row per scheme (``table``) and the JSON summary written as ``eval.json``."""

    TABLE = "eval"
    SUMMARY = "eval.json"


def evaluate(
    model: nn.Module | LoadedModel,
    windows: Windows,
    schemes: Sequence[Scheme],
    *,
    text: TextSource | None = None,
    layers: str | Sequence[LinearLayer] | None = None,
    calibration: Windows | None = None,
    calibration_text: TextSource | None = None,
    ignore: str | Sequence[str] | None = None,
    ignore_source: str | None = None,
    batch_size: int = 1,
    progress: StageProgress | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` under each scheme, in order.

    Activations and weights of the selected Linear layers (default: every Linear in the decoder
    blocks; ``lm_head`` stays in full precision, as in SmoothQuant) are treated as each scheme says,
    except the layers ``ignore`` names (a regular expression over module names, or the names
    themselves), which stay in full precision: a plan from ``advise`` re-measured.
    SmoothQuant schemes need ``calibration`` windows (from text other than the evaluation text).
    Each row carries its per-window NLLs and a bootstrap interval; with an ``fp`` scheme among them,
    every other row its paired difference from fp on the same windows.
    """
    net, info, _ = unpack(model)
    if not schemes:
        raise ValueError("evaluate needs at least one scheme")
    selected, ignored = split_ignored(resolve_layers(net, layers), ignore)
    smoothing: dict[float, dict[str, torch.Tensor]] = {}
    rows = []
    for scheme in schemes:
        factors = None
        if scheme.smooth_alpha is not None:
            if calibration is None:
                raise ValueError(f"scheme {scheme.name} needs calibration windows")
            if scheme.smooth_alpha not in smoothing:
                smoothing[scheme.smooth_alpha] = calibrate_smoothing(
                    net, selected, calibration, scheme.smooth_alpha, batch_size=batch_size)
            factors = smoothing[scheme.smooth_alpha]
        rows.append(run_scheme(net, windows, scheme, selected, smoothing=factors, batch_size=batch_size,
                               progress=stage_callback(progress, scheme.name)))
    rows = with_comparisons(rows, next((r for r in rows if r["mode"] == "fp"), None))
    table = pl.DataFrame(rows, infer_schema_length=None)
    summary = {
        **run_context(info, text, windows, "eval"),
        "protocol": protocol_text(windows),
        "uncertainty": METHOD,
        "results": rows,
        "layers": {"count": len(selected), "pattern": layers if isinstance(layers, str) else None,
                   "lm_head": "full precision", "full_precision": [layer.name for layer in ignored],
                   "ignore": ignore_source or (ignore if isinstance(ignore, str) else None)},
        "calibration": (
            {"text": text_facts(calibration_text), "windows": calibration.as_dict()}
            if calibration is not None and smoothing else None
        ),
        "settings": {"batch_size": batch_size},
    }
    return EvalResult(table, summary)
