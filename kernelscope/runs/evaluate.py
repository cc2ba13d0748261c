"""``evaluate``: perplexity of a model under several schemes, one model load, one tokenization.

Protocol (SmoothQuant, AWQ, GPTQ, OmniQuant): the text is tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens, the tail dropped; each window is one forward pass; the
perplexity is ``exp`` of the mean negative log-likelihood of every token predicted from the tokens
before it in its window (``seqlen - 1`` per window).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from kernelscope.capture import LinearInputCapture
from kernelscope.data import TextSource, Windows
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


def protocol_text(windows: Windows) -> str:
    return (
        f"text tokenized once; {len(windows)} non-overlapping {windows.seqlen}-token windows "
        f"({windows.selection}), tail dropped; perplexity = exp(mean NLL over "
        f"{len(windows) * (windows.seqlen - 1):,} predicted tokens, {windows.seqlen - 1} per window) "
        "— the WikiText-2 protocol of SmoothQuant, AWQ, GPTQ and OmniQuant"
    )


def nll_pass(
    model: nn.Module,
    windows: Windows,
    *,
    batch_size: int = 1,
    after_batch: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """Summed NLL (float64) over every predicted token of every window, and the token count."""
    device = model_device(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
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
                              batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.double()
        del logits
        if progress is not None:
            progress(min(first + batch_size, n), n)
    return float(total), n * (windows.seqlen - 1)


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


def run_scheme(
    model: nn.Module,
    windows: Windows,
    scheme: Scheme,
    layers: list[LinearLayer],
    *,
    smoothing: dict[str, torch.Tensor] | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` under ``scheme`` on ``windows``, with the activation kernel it caused."""
    started = time.perf_counter()
    applied = SchemeApplied(layers, scheme, smoothing, seq_len=windows.seqlen)
    with eval_mode(model), applied:
        nll, tokens = nll_pass(model, windows, batch_size=batch_size, after_batch=applied.end_batch,
                               progress=progress)
    seconds = time.perf_counter() - started
    kernel = int(applied.kernel) if applied.kernel is not None else None
    elements = int(applied.elements) if applied.elements is not None else None
    mean = nll / tokens
    perplexity = math.exp(mean) if math.isfinite(mean) and mean < 700 else (math.nan if math.isnan(mean) else math.inf)
    return {
        **scheme.describe(),
        "perplexity": perplexity,
        "finite": math.isfinite(nll),  # False: the model produced NaN/Inf logits under this scheme
        "nll": nll / tokens,
        "tokens": tokens,
        "windows": len(windows),
        "kernel_elements": kernel,
        "elements": elements,
        "kernel_fraction": kernel / elements if kernel is not None and elements else None,
        "seconds": round(seconds, 3),
    }


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
    batch_size: int = 1,
    progress: StageProgress | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` under each scheme, in order.

    Activations and weights of the selected Linear layers (default: every Linear in the decoder
    blocks; ``lm_head`` stays in full precision, as in SmoothQuant) are treated as each scheme says.
    SmoothQuant schemes need ``calibration`` windows (from text other than the evaluation text).
    """
    net, info, _ = unpack(model)
    if not schemes:
        raise ValueError("evaluate needs at least one scheme")
    selected = resolve_layers(net, layers)
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
    table = pl.DataFrame(rows, infer_schema_length=None)
    summary = {
        **run_context(info, text, windows, "eval"),
        "protocol": protocol_text(windows),
        "results": rows,
        "layers": {"count": len(selected), "pattern": layers if isinstance(layers, str) else None,
                   "lm_head": "full precision"},
        "calibration": (
            {"text": text_facts(calibration_text), "windows": calibration.as_dict()}
            if calibration is not None and smoothing else None
        ),
        "settings": {"batch_size": batch_size},
    }
    return EvalResult(table, summary)
