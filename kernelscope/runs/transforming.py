"""Transforms bound to a model's layers: calibration where a step needs it, one
:class:`~kernelscope.quant.transforms.LayerTransform` per layer, and what a result row says of them.

A calibrated step (SmoothQuant) is bound with the channel maxima of its own input: the layer's input
over the calibration windows after the steps before it, and the weight's column maxima after them.
One calibration pass serves every transform whose steps before a calibrated one are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernelscope.capture import LinearInputCapture
from kernelscope.data import Windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer
from kernelscope.quant import targets
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
                    f"transform {spec.label} is calibrated on each layer's weight, but {len(offloaded)} "
                    f"layers (first {offloaded[0]}) are offloaded to disk by the device map; give "
                    "--max-memory more room")
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

    def _statistics(self, prefix: TransformSpec,
                    bound: dict[str, LayerTransform]) -> dict[str, ChannelMaxima]:
        """Channel maxima of each layer's input and weight in the basis after ``prefix`` (bound)."""
        key = (prefix.label, prefix.seed)
        if key not in self._maxima:
            act = calibration_maxima(self.model, self.layers, self.calibration, bound,
                                     batch_size=self.batch_size)
            fused = targets.fused_groups((layer.name for layer in self.layers), part=True)
            self._maxima[key] = {
                layer.name: ChannelMaxima(act[layer.name], weight_column_maxima(
                    bound[layer.name].weight(weight_out_in(layer.module).detach())),
                    layer.module.weight.dtype, len(fused.get(layer.name, (layer.name,))))
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

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # as the profile runs it
    every_position = head is not None and any(layer.module is head for layer in layers)
    with eval_mode(model), LinearInputCapture({layer.name: layer.module for layer in layers}, observer):
        for first in range(0, len(windows), batch_size):
            forward_windows(model, windows.tokens[first : first + batch_size], all_logits=every_position)
    return act_max


def calibration_ranges(model: nn.Module, layers: Sequence[LinearLayer], windows: Windows,
                       bound: dict[str, LayerTransform], *, batch_size: int = 1
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(min, max)`` of every element of each layer's input after its transform ``bound[name]``, over
    ``windows``, the model in full precision: what a static min-max observer sees."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def observer(name: str, x: torch.Tensor) -> None:
        t = bound.get(name)
        lo, hi = torch.aminmax(x.detach() if t is None else t.activation(x.detach()))
        if name in ranges:
            lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
        ranges[name] = (lo, hi)

    with eval_mode(model), LinearInputCapture({layer.name: layer.module for layer in layers}, observer):
        for first in range(0, len(windows), batch_size):
            forward_windows(model, windows.tokens[first : first + batch_size])
    return ranges


def bind_transforms(model: nn.Module, layers: Sequence[LinearLayer],
                    transforms: Sequence[TransformSpec | ModelTransform], calibration: Windows | None = None,
                    *, batch_size: int = 1) -> tuple[list[ModelTransform], bool]:
    """``transforms`` bound to ``layers`` (calibrated on ``calibration`` where a step needs it; bound
    ones kept as they are), and whether a calibration pass ran. Two with one label are refused."""
    if not transforms:
        raise ValueError("at least one transform is needed (IDENTITY for none)")
    binder = TransformBinder(model, layers, calibration, batch_size=batch_size)
    bound = [t if isinstance(t, ModelTransform) else binder.bind(t) for t in transforms]
    labels = [t.label for t in bound]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice is not None:
        raise ValueError(f"transform {twice} is given twice")
    names = {layer.name for layer in layers}
    for t in bound:
        if not names <= set(t.layers):
            raise ValueError(f"transform {t.label} is not bound to every selected layer")
    return bound, binder.calibrated


def identity_transform(layers: Sequence[LinearLayer]) -> ModelTransform:
    """``none`` bound to ``layers``."""
    return ModelTransform(IDENTITY, {layer.name: LayerTransform(layer.in_features) for layer in layers})
