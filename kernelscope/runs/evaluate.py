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

from kernelscope.data import TextSource, Windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant.transforms import IDENTITY, TransformSpec
from kernelscope.runs.common import (
    StageProgress,
    TableResult,
    resolve_layers,
    run_context,
    stage_callback,
    text_facts,
    unpack,
)
from kernelscope.runs.fakequant import SchemeApplied
from kernelscope.runs.forward import eval_mode, model_device
from kernelscope.runs.schemes import Scheme
from kernelscope.runs.transforming import ModelTransform, TransformBinder, identity_transform


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


def run_scheme(
    model: nn.Module,
    windows: Windows,
    scheme: Scheme,
    layers: list[LinearLayer],
    *,
    transform: ModelTransform | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` under ``scheme`` on ``windows``, with the activation kernel it caused.

    ``transform`` (bound to ``layers``; default none) changes the basis the scheme quantizes in; it
    must include the scheme's own transform (see :func:`evaluate`).
    """
    started = time.perf_counter()
    transform = transform or identity_transform(layers)
    applied = SchemeApplied(layers, scheme, transform.layers, seq_len=windows.seqlen)
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
        **transform.describe(),
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


def scheme_transform(scheme: Scheme, transform: TransformSpec) -> TransformSpec:
    """The basis ``scheme`` quantizes in under ``transform``: its own transform (SmoothQuant's), then
    ``transform``. Raises KernelscopeError where a step would apply twice."""
    try:
        return scheme.transform.then(transform)
    except ValueError as exc:
        raise KernelscopeError(f"scheme {scheme.name} with transform {transform.label}: {exc}") from None


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
    batch_size: int = 1,
    progress: StageProgress | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``windows`` under each scheme and each transform, scheme by scheme.

    Activations and weights of the selected Linear layers (default: every Linear in the decoder
    blocks; ``lm_head`` stays in full precision, as in SmoothQuant) are treated as each scheme says,
    in the basis of each transform (``none`` the identity): the scheme's own transform (SmoothQuant
    schemes) first, then the one given. Calibrated transforms need ``calibration`` windows (from
    text other than the evaluation text).
    """
    net, info, _ = unpack(model)
    if not schemes:
        raise ValueError("evaluate needs at least one scheme")
    if not transforms:
        raise ValueError("evaluate needs at least one transform (IDENTITY for none)")
    selected = resolve_layers(net, layers)
    pairs = [(scheme, scheme_transform(scheme, t)) for scheme in schemes for t in transforms]
    binder = TransformBinder(net, selected, calibration, batch_size=batch_size)
    for _, spec in pairs:  # every width checked and every calibration done before the first evaluation
        binder.bind(spec)
    rows = []
    for scheme, spec in pairs:
        stage = scheme.name if len(transforms) == 1 else f"{scheme.name}, {spec.label}"
        rows.append(run_scheme(net, windows, scheme, selected, transform=binder.bind(spec),
                               batch_size=batch_size, progress=stage_callback(progress, stage)))
    table = pl.DataFrame(rows, infer_schema_length=None)
    summary = {
        **run_context(info, text, windows, "eval"),
        "protocol": protocol_text(windows),
        "results": rows,
        "layers": {"count": len(selected), "pattern": layers if isinstance(layers, str) else None,
                   "lm_head": "full precision"},
        "transforms": transforms_facts(transforms),
        "calibration": (
            {"text": text_facts(calibration_text), "windows": calibration.as_dict()}
            if calibration is not None and binder.calibrated else None
        ),
        "settings": {"batch_size": batch_size},
    }
    return EvalResult(table, summary)


def transforms_facts(transforms: Sequence[TransformSpec]) -> dict[str, Any]:
    """What a summary says about the transforms of a run and how they were applied."""
    return {
        "given": [t.label for t in transforms],
        "seed": next((t.seed for t in transforms if t.seed is not None), None),
        "basis": "each quantizer acts on T(x); schemes that quantize weights use the weight in that basis "
                 "(W·A^-T), quantized there; schemes with full-precision weights map the activation back "
                 "(T^-1) and keep the layer's own weight",
    }
