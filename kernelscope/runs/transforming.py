"""Transforms bound to a model's layers: calibration where a step needs it, one
:class:`~kernelscope.quant.transforms.LayerTransform` per layer, and what a result row says of them.

A calibrated step (SmoothQuant) is bound with the channel maxima of its own input: the layer's input
over the calibration windows after the steps before it, and the weight's column maxima after them.
One calibration pass serves every transform whose steps before a calibrated one are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernelscope.capture import LinearInputCapture
from kernelscope.data import Windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer
from kernelscope.quant import QuantizerConfig, as_sequences
from kernelscope.quant import formats as F
from kernelscope.quant.transforms import (
    IDENTITY,
    ChannelMaxima,
    LayerTransform,
    TransformSpec,
    describe_layers,
    input_channel_maxima,
    weight_column_maxima,
)
from kernelscope.runs.fakequant import weight_out_in
from kernelscope.runs.forward import eval_mode, forward_windows
from kernelscope.runs.profiling import profile


@dataclass(frozen=True)
class ModelTransform:
    """A transform bound to every selected layer (layers of one width share one object when nothing
    was calibrated)."""

    spec: TransformSpec
    layers: dict[str, LayerTransform]

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def is_identity(self) -> bool:
        return self.spec.is_identity

    def describe(self) -> dict[str, Any]:
        """The columns of a result row: the transform's label, its seed, and the transform each layer
        got (``hadamard:64 (I=576), hadamard:512 (I=1536)``) where a default differs per layer."""
        return {"transform": self.label, "transform_seed": self.spec.seed,
                "transform_layers": None if self.is_identity else describe_layers(self.layers.values())}


def check_transform(spec: TransformSpec, layers: Sequence[LinearLayer]) -> None:
    """Raise KernelscopeError naming the first layer ``spec`` cannot apply to (a Hadamard block that
    does not divide its width)."""
    for layer in layers:
        try:
            spec.check(layer.in_features)
        except ValueError as exc:
            raise KernelscopeError(f"transform {spec.label}: layer {layer.name}: {exc}") from None


class TransformBinder:
    """Binds transforms to ``layers`` of ``model``, calibrating on ``calibration`` where needed.

    Bound transforms and calibration statistics are kept, so a transform given with several schemes
    is bound (and calibrated) once.
    """

    def __init__(self, model: nn.Module, layers: Sequence[LinearLayer], calibration: Windows | None = None,
                 *, batch_size: int = 1) -> None:
        self.model = model
        self.layers = list(layers)
        self.calibration = calibration
        self.batch_size = batch_size
        self._bound: dict[tuple[str, int | None], ModelTransform] = {}
        self._maxima: dict[tuple[str, int | None], dict[str, ChannelMaxima]] = {}
        self.calibrated = False  # True once a calibration pass ran

    def bind(self, spec: TransformSpec) -> ModelTransform:
        key = (spec.label, spec.seed)
        if key not in self._bound:
            check_transform(spec, self.layers)
            if spec.needs_calibration and self.calibration is None:
                raise ValueError(f"transform {spec.label} needs calibration windows")
            offloaded = [layer.name for layer in self.layers if layer.module.weight.device.type == "meta"]
            if spec.needs_calibration and offloaded:
                raise KernelscopeError(
                    f"transform {spec.label} is calibrated on each layer's weight, but {len(offloaded)} layers "
                    f"(first {offloaded[0]}) are offloaded to disk by the device map; give --max-memory more room")
            self._bound[key] = ModelTransform(spec, self._bind_layers(spec))
        return self._bound[key]

    def _bind_layers(self, spec: TransformSpec) -> dict[str, LayerTransform]:
        if not spec.needs_calibration:  # one object per width, so layers fed the same tensor share work
            by_width = {w: spec.bind(w) for w in dict.fromkeys(layer.in_features for layer in self.layers)}
            return {layer.name: by_width[layer.in_features] for layer in self.layers}
        bound = {layer.name: LayerTransform(layer.in_features) for layer in self.layers}
        for i, step in enumerate(spec.steps):
            prefix = TransformSpec(spec.steps[:i]).with_seed(spec.seed)
            stats = self._statistics(prefix, bound) if step.entry.calibrated else {}
            for layer in self.layers:
                bound[layer.name] = bound[layer.name].then(
                    step.bind(layer.in_features, spec.seed, stats.get(layer.name)))
        return bound

    def _statistics(self, prefix: TransformSpec, bound: dict[str, LayerTransform]) -> dict[str, ChannelMaxima]:
        """Channel maxima of each layer's input and weight in the basis after ``prefix`` (bound)."""
        key = (prefix.label, prefix.seed)
        if key not in self._maxima:
            act = calibration_maxima(self.model, self.layers, self.calibration, bound, batch_size=self.batch_size)
            self._maxima[key] = {
                layer.name: ChannelMaxima(act[layer.name], weight_column_maxima(
                    bound[layer.name].weight(weight_out_in(layer.module).detach())))
                for layer in self.layers}
            self.calibrated = True
        return self._maxima[key]


def calibration_maxima(model: nn.Module, layers: Sequence[LinearLayer], windows: Windows,
                       bound: dict[str, LayerTransform], *, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """``max |x_j|`` of each layer's input after its transform ``bound[name]``, over ``windows``."""
    act_max: dict[str, torch.Tensor] = {}

    def observer(name: str, x: torch.Tensor) -> None:
        m = input_channel_maxima(bound[name].activation(x.detach()))  # (I,)
        act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)

    with eval_mode(model), LinearInputCapture({layer.name: layer.module for layer in layers}, observer):
        for first in range(0, len(windows), batch_size):
            forward_windows(model, windows.tokens[first : first + batch_size])
    return act_max


def measured_kernels(model: nn.Module, windows: Windows, configs: list[QuantizerConfig],
                     layers: list[LinearLayer], transform: ModelTransform, *, tokenizer: Any = None,
                     batch_size: int = 1, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """The model-level kernel of each configuration on the full-precision inputs in ``transform``'s
    basis: the profile's for the identity, a counting pass in that basis otherwise."""
    if transform.is_identity:
        measured = profile(model, windows, configs, tokenizer=tokenizer, layers=layers,
                           batch_size=batch_size, progress=progress)
        rows = measured.model_level.select("config", "quantizer", "bits", "alpha", "kernel_fraction").to_dicts()
        return [{**r, "transform": transform.label} for r in rows]
    rows = transformed_kernels(model, windows, configs, layers, transform, batch_size=batch_size, progress=progress)
    keep = ("config", "quantizer", "bits", "alpha", "kernel_fraction", "transform")
    return [{k: r[k] for k in keep} for r in rows]


def transformed_kernels(model: nn.Module, windows: Windows, configs: Sequence[QuantizerConfig],
                        layers: Sequence[LinearLayer], transform: ModelTransform,
                        *, batch_size: int = 1, progress=None) -> list[dict[str, Any]]:
    """The model-level kernel of each configuration on the full-precision inputs in ``transform``'s
    basis: elements of ``transform.activation(x)`` that round to zero, summed over every covered
    Linear input and window (nothing about the forward pass changes).

    Counted element by element in torch (one kernel mask per input and configuration); for the
    identity it equals the profile's ``kernel_elements``.
    """
    kernels = [torch.zeros((), dtype=torch.int64) for _ in configs]
    elements = [0]
    last: list[Any] = [None, None, None]  # input, transform, counts: q/k/v and gate/up share one count

    def observer(name: str, x: torch.Tensor) -> None:
        t = transform.layers[name]
        if last[0] is not x or last[1] is not t:
            seqs = as_sequences(t.activation(x.detach()), windows.seqlen)  # (B, T, I)
            finite = torch.isfinite(seqs)
            last[:] = [x, t, [_kernel(seqs, c, finite) for c in configs] + [finite.sum()]]
        for i, count in enumerate(last[2][:-1]):
            kernels[i] += count.cpu()
        elements[0] += int(last[2][-1])

    with eval_mode(model), LinearInputCapture({layer.name: layer.module for layer in layers}, observer):
        n = len(windows)
        for first in range(0, n, batch_size):
            forward_windows(model, windows.tokens[first : first + batch_size])
            last[:] = [None, None, None]
            if progress is not None:
                progress(min(first + batch_size, n), n)
    return [{"config": c.label, "quantizer": c.quantizer, "bits": c.bits, "alpha": c.alpha,
             "transform": transform.label, "kernel_elements": int(k), "elements": elements[0],
             "kernel_fraction": int(k) / elements[0] if elements[0] else None}
            for c, k in zip(configs, kernels, strict=True)]


def _kernel(seqs: torch.Tensor, config: QuantizerConfig, finite: torch.Tensor) -> torch.Tensor:
    """Finite elements of ``seqs (B, T, I)`` in the kernel of ``config``."""
    return (F.kernel_mask(seqs, config.format) & finite).sum()


def identity_transform(layers: Sequence[LinearLayer]) -> ModelTransform:
    """``none`` bound to ``layers``."""
    return ModelTransform(IDENTITY, {layer.name: LayerTransform(layer.in_features) for layer in layers})
