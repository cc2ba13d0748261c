"""``profile -q LIBRARY:NAME``: each selected Linear's activation kernel as a deploying library computes it.

A deployment target's input quantizer (:mod:`kernelscope.quant.targets`) rounds some elements of a
layer's input, exactly as the module receives it, to zero: the target's kernel. It is counted in the
profile's own forward passes, beside kernelscope's formats, with the library's arithmetic and, for a
static scale, the scales calibrated before the pass (as ``eval`` calibrates them). Its rows of
``layers.parquet`` carry the kernel; the zero-bound figures, defined for kernelscope's formats, are empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kernelscope.errors import KernelscopeError
from kernelscope.quant import targets
from kernelscope.runs.schemes import Scheme
from kernelscope.stats.table import FIGURES

STATE_KEY = ("", "deployment targets")
"""Where a checkpoint keeps the targets' counts, beside the accumulators' (layer, transform) keys."""


def check_targets(schemes: Sequence[Scheme], transforms: Sequence[Any]) -> None:
    """Refuse what a profile cannot count for a target: no activation quantizer, or another basis."""
    why = next(filter(None, (s.kernel_refusal(transforms, "profile") for s in schemes)), None)
    if why is not None:
        raise KernelscopeError(why)


class TargetKernels:
    """The hooks' counter of each target's kernel on each layer: kept on the device while a forward pass
    runs, added to the totals only once it completes."""

    def __init__(self, schemes: Sequence[Scheme],
                 calibration: Mapping[str, Mapping[str, targets.Calibration]],
                 static: Mapping[str, Any] | None = None) -> None:
        self.schemes = list(schemes)
        self.calibration = calibration
        self.static = dict(static or {})  # what the summary records of the calibrated scales
        self.kernel: dict[tuple[str, str], torch.Tensor] = {}  # (scheme, layer) -> int64 count
        self._pending: dict[tuple[str, str], torch.Tensor] = {}
        self._last: tuple[torch.Tensor | None, dict] = (None, {})  # the last input and its counts

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if self._last[0] is not x:  # layers fed one tensor (q/k/v, gate/up) share a dynamic count
            self._last = (x, {})
        for scheme in self.schemes:
            calibration = self.calibration.get(scheme.name, {}).get(name)
            shared = (scheme.name, None if calibration is None else id(calibration))
            if shared not in self._last[1]:
                try:
                    _, zero = targets.quantize_activation(x, scheme.target.input_activations, calibration)
                except ValueError as exc:
                    raise KernelscopeError(f"{scheme.name} on {name}: {exc}") from None
                self._last[1][shared] = torch.count_nonzero(zero)
            key, count = (scheme.name, name), self._last[1][shared]
            self._pending[key] = count if key not in self._pending else self._pending[key] + count

    def end_batch(self, completed: bool) -> None:
        self._last = (None, {})  # no reference to the pass's inputs is kept past it
        if completed:
            for key, count in self._pending.items():
                self.kernel[key] = count if key not in self.kernel else self.kernel[key] + count
        self._pending.clear()

    def state(self) -> dict[str, torch.Tensor]:
        """The totals as a checkpoint keeps them (CPU tensors, by ``scheme|layer``)."""
        return {f"{scheme}|{layer}": count.cpu() for (scheme, layer), count in self.kernel.items()}

    def load(self, state: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self.kernel = {tuple(key.split("|", 1)): count.to(device) for key, count in state.items()}

    def summary(self) -> dict[str, Any]:
        """What a profile's summary says of the targets (nothing without any): each one's library, the
        version its arithmetic was checked against and its activation quantizer; the static scales."""
        if not self.schemes:
            return {}
        described = {s.name: {"library": s.target.library, "checked": s.target.checked,
                              "input_activations": s.target.input_activations.label} for s in self.schemes}
        return {"deployment_targets": described, "static_scales": self.static}

    def counts(self) -> dict[tuple[str, str], int]:
        """Every total on the host (one read for all)."""
        keys = list(self.kernel)
        values = torch.stack([self.kernel[k].cpu() for k in keys]).tolist() if keys else []
        return dict(zip(keys, values, strict=True))

    def rows(self, layer: str, elements: int, counts: Mapping[tuple[str, str], int]) -> list[dict[str, Any]]:
        """The layer's configuration rows of ``layers.parquet``, one per target, over its ``elements``
        finite input elements."""
        out = []
        for scheme in self.schemes:
            args = scheme.target.input_activations
            kernel = counts.get((scheme.name, layer), 0)
            own = {"quantizer": scheme.name, "bits": args.num_bits, "alpha": None, "format": args.element,
                   "block_size": args.group_size, "config": scheme.name}
            out.append({**own, **dict.fromkeys(FIGURES), "kernel_elements": kernel,
                        "kernel_fraction": kernel / elements if elements else None})
        return out


def calibrate_targets(model: torch.nn.Module, schemes: Sequence[Scheme], layers: Sequence[Any], windows: Any,
                      *, batch_size: int = 1
                      ) -> tuple[dict[str, dict[str, targets.Calibration]], dict[str, Any]]:
    """Each target's static scales on each layer (calibrated on ``windows`` with the model in full
    precision, as ``eval`` does) and what the summary records of them (``static_scales``)."""
    from kernelscope.runs.evaluate import calibrate_target
    from kernelscope.runs.transforming import identity_transform

    scales, facts = {}, {}
    for scheme in schemes:
        scales[scheme.name], fact = calibrate_target(model, scheme, layers, identity_transform(layers),
                                                     windows, batch_size=batch_size)
        if fact:
            facts[scheme.name] = fact
    return scales, facts

