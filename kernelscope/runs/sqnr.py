"""``eval --sqnr``: the error a scheme makes in each covered Linear's output, beside the kernel it causes.

For a layer with full-precision input ``x`` and weight ``W``, the output ``y = x·Wᵀ`` (the bias left
out: no scheme changes it, and it would only add to the signal) is compared with the output under the
scheme's activations alone, ``y_a = Q_a(x)·Wᵀ``, its weights alone, ``y_w = x·Q_w(W)ᵀ``, and both,
``y_aw = Q_a(x)·Q_w(W)ᵀ``: SQNR = 10·log10(Σ y² / Σ (y − ŷ)²) in dB, each sum over every window. The
quantized operands are those :class:`~kernelscope.runs.fakequant.SchemeApplied` feeds the layer (in a
transformed basis, ``T(x)`` and ``W·A⁻ᵀ``, where the scheme quantizes there; with a deployment target's
own arithmetic and calibrated scales), and the activation kernel is the share of the input's elements
that ``Q_a`` rounds to zero. Every layer sees the inputs of the model in full precision (one forward pass
per scheme, hooks on the layers), so a layer's figure is its own error, not that of the layers before it.

Products and sums are computed in float64, so that the model's own arithmetic (bfloat16, TF32) adds no
error of its own. An exact output (no error: infinite SQNR, which JSON cannot hold) is stored as null,
as is a part the scheme leaves in full precision (the activations of a weight-only target, the weights
of ``remove-kernel-*``). A group's figure (a module type, the model) pools its layers: 10·log10 of their
summed output energy over their summed error energy, i.e. the mean of the layers' noise-to-signal
ratios weighted by their output energy, in dB.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch
from torch import nn

from kernelscope.capture import LinearInputCapture
from kernelscope.data import Windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer
from kernelscope.quant import targets
from kernelscope.results.schema import COLUMNS
from kernelscope.runs.fakequant import SchemeApplied, weight_out_in
from kernelscope.runs.forward import eval_mode, forward_windows
from kernelscope.runs.schemes import Scheme
from kernelscope.runs.transforming import ModelTransform, identity_transform

DEFINITION = ("SQNR = 10·log10(Σ y² / Σ (y − ŷ)²) in dB of each covered Linear's output y = x·Wᵀ (bias left "
              "out), x the input of the model in full precision, ŷ the output with the scheme's activations "
              "(sqnr_activations_db), weights (sqnr_weights_db) or both (sqnr_db) quantized as eval "
              "quantizes them; sums over every window, in float64")
WEIGHTING = ("output energy: a group's SQNR is 10·log10 of its layers' summed Σ y² over their summed "
             "Σ (y − ŷ)², the mean of their noise-to-signal ratios weighted by output energy, in dB")
NULLS = ("null where the output is exact (no error: infinite SQNR, which JSON cannot hold) or where the "
         "scheme leaves that part in full precision")


def decibels(signal: float, noise: float) -> float | None:
    """``10·log10(signal / noise)``; None for an exact output (``noise`` 0: infinite SQNR), NaN where a
    sum is NaN (non-finite activations)."""
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0:
        return None
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


@dataclass
class LayerSums:
    """One layer's sums over the windows: output energy, the three error energies (None for a part the
    scheme leaves alone) and the activation kernel; 0-d tensors on the layer's device until read."""

    signal: Any = 0.0
    activations: Any = None
    weights: Any = None
    both: Any = 0.0
    kernel: Any = None
    elements: int = 0
    tokens: int = 0

    def read(self) -> dict[str, float | int | None]:
        """The sums as Python numbers (one device synchronisation per layer)."""
        def num(v):
            return None if v is None else float(v)

        return {"signal": num(self.signal), "activations": num(self.activations),
                "weights": num(self.weights), "both": num(self.both),
                "kernel": None if self.kernel is None else int(self.kernel),
                "elements": self.elements, "tokens": self.tokens}


CHUNK = 1 << 24
"""Output elements computed at once (128 MiB in float64): a wide output (lm_head's vocabulary) is
taken a few rows of tokens at a time."""


def output_errors(x: torch.Tensor, w: torch.Tensor, x_b: torch.Tensor, x_q: torch.Tensor, w_b: torch.Tensor,
                  w_q: torch.Tensor, activations: bool, weights: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``Σ y²`` and ``Σ (y − ŷ)²`` for ``ŷ`` with quantized activations, weights and both, in float64:
    ``y = x·wᵀ`` (``x (..., I)``, ``w (O, I)``), the quantized outputs from the operands in the basis the
    layer computes in (``x_b``, ``w_b`` unquantized, ``x_q``, ``w_q`` as the scheme has them). A part the
    scheme leaves alone (``activations`` or ``weights`` False) has no error of its own (None)."""
    wide: dict[int, torch.Tensor] = {}

    def f64(t: torch.Tensor) -> torch.Tensor:  # one float64 copy of each weight, however many names it has
        return wide.setdefault(id(t), t.double())

    pairs = {"a": (x_q, w_b)} if activations else {}
    if weights:
        pairs["w"] = (x_b, w_q)
    if activations and weights:
        pairs["aw"] = (x_q, w_q)
    rows = [t.reshape(-1, t.shape[-1]) for t in (x, *(i for i, _ in pairs.values()))]
    mats = [f64(w), *(f64(m) for _, m in pairs.values())]
    sums = [torch.zeros((), dtype=torch.float64, device=w.device) for _ in mats]
    step = max(1, CHUNK // w.shape[0])
    for first in range(0, rows[0].shape[0], step):
        y = rows[0][first : first + step].to(w.device, torch.float64) @ mats[0].T  # (n, O)
        sums[0] += y.square().sum()
        for k in range(1, len(mats)):
            chunk = rows[k][first : first + step].to(w.device, torch.float64)
            sums[k] += (y - chunk @ mats[k].T).square().sum()
    errors = dict(zip(pairs, sums[1:], strict=True))
    both = errors.get("aw", errors.get("a", errors.get("w")))
    return sums[0], errors.get("a"), errors.get("w"), both


class _Observer:
    """The observer of :class:`~kernelscope.capture.LinearInputCapture`: adds each covered layer's output
    energies under ``applied``'s scheme to ``sums``. Layers fed one tensor (q/k/v) with one transform share
    its quantization, as in :class:`~kernelscope.runs.fakequant.SchemeApplied`."""

    def __init__(self, applied: SchemeApplied, modules: Mapping[str, nn.Module]) -> None:
        self.applied = applied
        self.modules = modules
        self.sums = {name: LayerSums() for name in modules}
        self._weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last: tuple[Any, Any, Any] = (None, None, None)

    def _inputs(self, name: str, x: torch.Tensor):
        t = self.applied.transforms.get(name)
        if self._last[0] is not x or self._last[1] is not t:
            self._last = (x, t, self.applied.input_operands(name, x))
        return self._last[2]

    def __call__(self, name: str, x: torch.Tensor) -> None:
        scheme, module = self.applied.scheme, self.modules[name]
        x_b, x_q, zeros = self._inputs(name, x)
        if name not in self._weights:  # the quantized copy, kept for every window as eval keeps it
            self._weights[name] = self.applied.weight_operands(name, module)
        w_b, w_q = self._weights[name]
        signal, e_a, e_w, both = output_errors(x, weight_out_in(module).detach(), x_b, x_q, w_b, w_q,
                                               scheme.changes_activation, scheme.changes_weight)
        s = self.sums[name]
        s.signal, s.both = s.signal + signal, s.both + both
        if e_a is not None:
            s.activations = e_a if s.activations is None else s.activations + e_a
        if e_w is not None:
            s.weights = e_w if s.weights is None else s.weights + e_w
        if zeros is not None:
            s.kernel = zeros if s.kernel is None else s.kernel + zeros.to(s.kernel.device)
        s.elements += x.numel()
        s.tokens += x.numel() // x.shape[-1]

    def end_batch(self) -> None:
        """Drop the reference to the last input (after each forward pass)."""
        self._last = (None, None, None)


def _measure(model: nn.Module, windows: Windows, applied: SchemeApplied, layers: Sequence[LinearLayer],
             batch_size: int, progress: Callable[[int, int], None] | None) -> dict[str, LayerSums]:
    """One forward pass of the model in full precision over ``windows``, the observer on ``layers``."""
    observer = _Observer(applied, {layer.name: layer.module for layer in layers})
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    every_position = head is not None and any(layer.module is head for layer in layers)
    n = len(windows)
    with eval_mode(model), LinearInputCapture(observer.modules, observer):
        for first in range(0, n, batch_size):
            try:
                forward_windows(model, windows.tokens[first : first + batch_size], all_logits=every_position)
            finally:
                observer.end_batch()
            if progress is not None:
                progress(min(first + batch_size, n), n)
    return observer.sums


def _pooled(parts: Sequence[dict], scheme: Scheme) -> dict[str, Any]:
    """The SQNR of a group of layers (their energies summed) and its activation kernel."""
    signal = sum(p["signal"] for p in parts)

    def db(key: str, applies: bool) -> float | None:
        return decibels(signal, sum(p[key] or 0.0 for p in parts)) if applies and parts else None

    kernel = sum(p["kernel"] or 0 for p in parts)
    elements = sum(p["elements"] for p in parts)
    return {
        "layers": len(parts),
        "sqnr_db": db("both", bool(parts)),
        "sqnr_activations_db": db("activations", scheme.changes_activation),
        "sqnr_weights_db": db("weights", scheme.changes_weight),
        "kernel_fraction": kernel / elements if scheme.changes_activation and elements else None,
    }


@dataclass
class SqnrMeasurements:
    """Every SQNR pass of a run: one row per scheme × transform × layer, and per pass the figures of the
    model and of each module type."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)

    def measure(self, model: nn.Module, windows: Windows, scheme: Scheme, layers: Sequence[LinearLayer], *,
                transform: ModelTransform | None = None,
                calibration: Mapping[str, targets.Calibration] | None = None, batch_size: int = 1,
                progress: Callable[[int, int], None] | None = None) -> None:
        """Add the SQNR of every layer of ``layers`` under ``scheme`` (in ``transform``'s basis, with a
        target's ``calibration``), on the full-precision model's inputs over ``windows``."""
        if not scheme.mode.quantizes:
            raise ValueError(f"{scheme.name} quantizes nothing: its output error is not defined")
        offloaded = [layer.name for layer in layers if layer.module.weight.device.type == "meta"]
        if offloaded:
            raise KernelscopeError(f"the output SQNR needs every layer's weight in memory, but "
                                   f"{len(offloaded)} layers (first {offloaded[0]}) are offloaded to disk "
                                   "by the device map; give --max-memory more room")
        started = time.perf_counter()
        transform = transform or identity_transform(layers)
        applied = SchemeApplied(list(layers), scheme, transform.layers, seq_len=windows.seqlen,
                                calibration=calibration)
        sums = _measure(model, windows, applied, layers, batch_size, progress)
        parts = {layer.name: sums[layer.name].read() for layer in layers}
        for layer in layers:
            self.rows.append(_row(layer, parts[layer.name], scheme, transform.label))
        types = list(dict.fromkeys(layer.module_type for layer in layers))
        self.passes.append({
            "scheme": scheme.name, "transform": transform.label, **_pooled(list(parts.values()), scheme),
            "exact_layers": sum(1 for p in parts.values() if p["tokens"] and p["both"] == 0),
            "activations": scheme.changes_activation, "weights": scheme.changes_weight,
            "by_module_type": [
                {"module_type": kind, **_pooled([parts[layer.name] for layer in layers
                                                 if layer.module_type == kind], scheme)} for kind in types],
            "seconds": round(time.perf_counter() - started, 3),
        })

    def table(self) -> pl.DataFrame:
        """``sqnr.parquet``: one row per scheme × transform × layer."""
        return pl.DataFrame(self.rows, schema={name: COLUMNS[name].dtype for name in SQNR_COLUMNS})

    def summary(self) -> dict[str, Any]:
        """What ``summary.json`` says of the passes: the definition, the weighting, each pass's figures."""
        return {"definition": DEFINITION, "weighting": WEIGHTING, "nulls": NULLS, "results": self.passes}


def _row(layer: LinearLayer, p: dict, scheme: Scheme, transform: str) -> dict[str, Any]:
    """One layer's row of ``sqnr.parquet``."""
    kernel = p["kernel"] if scheme.changes_activation else None
    return {
        "scheme": scheme.name, "transform": transform, "layer": layer.name, "block": layer.block,
        "module_type": layer.module_type, "in_features": layer.in_features,
        "out_features": int(weight_out_in(layer.module).shape[0]), "tokens": p["tokens"],
        "sqnr_db": decibels(p["signal"], p["both"]) if p["tokens"] else None,
        "sqnr_activations_db": decibels(p["signal"], p["activations"]) if p["activations"] is not None
        else None,
        "sqnr_weights_db": decibels(p["signal"], p["weights"]) if p["weights"] is not None else None,
        "kernel_elements": kernel, "elements": p["elements"] if kernel is not None else None,
        "kernel_fraction": kernel / p["elements"] if kernel is not None and p["elements"] else None,
    }


SQNR_COLUMNS = ("scheme", "transform", "layer", "block", "module_type", "in_features", "out_features",
                "tokens", "sqnr_db", "sqnr_activations_db", "sqnr_weights_db", "kernel_elements", "elements",
                "kernel_fraction")
"""The columns of ``sqnr.parquet``, in order."""
