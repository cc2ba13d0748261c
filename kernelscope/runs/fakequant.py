"""Apply a :class:`~kernelscope.runs.schemes.Scheme` to selected Linear layers for a ``with`` block.

Activations are changed (a change of basis, then the quantizer) by a forward pre-hook; quantized
weights are computed once per layer, swapped in for the length of that layer's forward call and
swapped back right after. On exit (error or not) every hook is removed, every weight is the caller's
original tensor, and caches are freed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kernelscope import element
from kernelscope.capture.hooks import Conv1D, ForwardHooks
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer, select_linear_layers
from kernelscope.quant import as_sequences, targets
from kernelscope.quant import formats as F
from kernelscope.quant.transforms import LayerTransform
from kernelscope.runs.schemes import Scheme


def _class_names(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s class and its base classes, which a recipe's targets may name."""
    return tuple(c.__name__ for c in type(module).__mro__)


def covered_layers(model: nn.Module, scheme: Scheme, selected: list[LinearLayer]) -> list[LinearLayer]:
    """The layers ``scheme`` quantizes: those its file names among every Linear of the model (lm_head
    included, as the library would), or else the ``selected`` ones. A file, or a preset as its library
    ships it, that quantizes a module that is not a Linear (an embedding, a norm) is refused:
    kernelscope quantizes Linear inputs only."""
    target = scheme.target
    reach = None if target is None else target.coverage or target.shipped
    if reach is None:
        return selected
    every = select_linear_layers(model, "", include_lm_head=True)
    linear = {layer.name for layer in every}
    try:
        for name, module in model.named_modules():
            leaf = not list(module.children())
            if name not in linear and leaf and reach.covers(name, _class_names(module)):
                raise KernelscopeError(f"{scheme.name} quantizes {name} ({type(module).__name__}), which is "
                                       "not a Linear layer; kernelscope quantizes Linear layers only")
        if target.coverage is None:
            return selected
        covered = [layer for layer in every if reach.covers(layer.name, _class_names(layer.module))]
    except ValueError as exc:
        raise KernelscopeError(f"{scheme.name}: {exc}") from None
    if not covered:
        raise KernelscopeError(f"{scheme.name} matches none of the model's {len(every)} Linear layers "
                               f"({reach.describe()})")
    return covered


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``(O, I)`` (Conv1D stores it as ``(I, O)``)."""
    w = module.weight
    return w.t() if bool(Conv1D) and isinstance(module, Conv1D) else w


def _as_module_layout(module: nn.Module, w_out_in: torch.Tensor) -> torch.Tensor:
    return w_out_in.t().contiguous() if bool(Conv1D) and isinstance(module, Conv1D) else w_out_in


class SchemeApplied:
    """Context manager: ``scheme`` in force on ``layers``; counts the activation kernel it causes.

    ``transforms`` maps layer names to the transform of their input basis (absent: none). The
    quantizer acts in that basis: the activation becomes ``T(x)`` and is quantized (or loses its
    kernel) there. A scheme that quantizes weights then feeds that to the weight in the same basis,
    ``W' = W·A⁻ᵀ``, quantized there; a scheme that keeps weights in full precision (fp, remove-kernel
    without weight bits) maps the activation back, ``T⁻¹(R(T(x)))``, and keeps the layer's own weight,
    which is the same product up to rounding and holds no second copy of the weights.
    ``seq_len`` is the window length, for models that flatten tokens before a Linear.
    ``kernel`` and ``elements`` are int64 counters on the model's device, read once at the end.
    A deployment target quantizes the input exactly as its library receives it (no reshaping into
    sequences), with ``calibration`` holding each layer's calibrated scales where it has static ones.
    """

    def __init__(self, layers: list[LinearLayer], scheme: Scheme,
                 transforms: Mapping[str, LayerTransform] | None = None, seq_len: int | None = None,
                 calibration: Mapping[str, targets.Calibration] | None = None) -> None:
        self.layers = layers
        self.scheme = scheme
        self.calibration = dict(calibration or {})
        self.transforms = {name: t for name, t in (transforms or {}).items() if not t.is_identity}
        weights = scheme.target.weights if scheme.target is not None else None
        part = weights is not None and weights.arithmetic.fuses_part_of_a_group
        self._fused = targets.fused_groups((layer.name for layer in layers), part)  # one NVFP4 scale
        self._modules = {layer.name: layer.module for layer in layers}
        self.seq_len = seq_len  # splits flattened (B·T, I) inputs back into sequences
        self.kernel: torch.Tensor | None = None
        self.elements: torch.Tensor | None = None
        self._hooks = ForwardHooks()
        self._weights: dict[str, torch.Tensor] = {}
        self._swapped: dict[str, tuple[nn.Module, torch.Tensor]] = {}
        self._last: tuple[torch.Tensor | None, Any, Any] = (None, None, None)

    # -- activation ---------------------------------------------------------------------------
    def _quantized(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` quantized (or with its kernel zeroed) as the scheme says, and its kernel count."""
        scheme, act = self.scheme, self.scheme.activation
        if scheme.target is not None:
            try:
                out, zero = targets.quantize_activation(x, scheme.target.input_activations,
                                                        self.calibration.get(name), scheme.kernel_scale)
            except ValueError as exc:
                raise KernelscopeError(f"{scheme.name} on {name}: {exc}") from None
            if scheme.mode.removes_kernel:
                out = torch.where(zero, torch.zeros((), dtype=x.dtype, device=x.device), x)
            return out, torch.count_nonzero(zero)
        seqs = as_sequences(x, self.seq_len)  # (B, T, I)
        if scheme.mode.removes_kernel:
            out, zeros = element.remove_kernel(seqs, act.format, scheme.kernel_scale)
        else:
            out, zeros = element.fake_quantize(seqs, act.format)
        return out.reshape(x.shape), zeros

    def input_operands(self, name: str, x: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Layer ``name``'s input ``x`` under the scheme, as ``(x_b, x_q, zeros)``: ``x`` in the basis of
        the weight the layer computes with (``T(x)`` where the scheme quantizes weights in a transformed
        basis, else ``x``); the input the layer receives (quantized or with its kernel zeroed in the
        transformed basis, mapped back where the layer keeps its own weight); and how many elements the
        quantizer rounded to zero (None where the scheme leaves activations alone). The forward pre-hook
        feeds ``x_q``; the SQNR pass (:mod:`kernelscope.runs.sqnr`) compares it with ``x_b``."""
        t = self.transforms.get(name)
        xt = x if t is None else t.activation(x)
        out, zeros = (xt, None) if not self.scheme.changes_activation else self._quantized(name, xt)
        if t is not None and not self.scheme.changes_weight:
            return x, t.inverse(out), zeros  # back to the layer's own basis and weight
        return xt, out, zeros

    def _activation(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # Layers fed the same tensor (q/k/v, gate/up) share one transform unless their transforms differ.
        t = self.transforms.get(name)
        if self._last[0] is x and self._last[1] is t:
            xq, zeros = self._last[2]
        else:
            _, xq, zeros = self.input_operands(name, x)
            self._last = (x, t, (xq, zeros))
        if zeros is not None:
            if self.kernel is None:
                self.kernel = torch.zeros((), dtype=torch.int64, device=x.device)
                self.elements = torch.zeros((), dtype=torch.int64, device=x.device)
            self.kernel += zeros.to(self.kernel.device)
            self.elements += x.numel()
        return xq

    # -- weight -------------------------------------------------------------------------------
    def weight_operands(self, name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``name``'s weight ``(O, I)`` as ``(w_b, w_q)``: in the basis of its input (``W·A⁻ᵀ`` where
        the scheme quantizes weights in a transformed basis, else ``W``), and as the scheme has the layer
        compute with it (``w_b`` quantized; ``w_b`` itself where weights stay in full precision)."""
        if not self.scheme.changes_weight:
            w = weight_out_in(module).detach()  # (O, I)
            return w, w
        w = self._in_basis(name, module)
        return w, self._weight_of(name, w)

    def _in_basis(self, name: str, module: nn.Module) -> torch.Tensor:
        """The weight ``(O, I)`` in the basis of the layer's input (``W·A⁻ᵀ`` under a transform)."""
        w = weight_out_in(module).detach()  # (O, I)
        return self.transforms[name].weight(w) if name in self.transforms else w

    def _joint(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The min and max over the weights of ``name``'s fused group, for a tensor-group target."""
        args = self.scheme.target.weights
        if args.strategy is not targets.Strategy.TENSOR_GROUP or name not in self._fused:
            return None
        ranges = [torch.aminmax(self._in_basis(m, self._modules[m])) for m in self._fused[name]]
        return torch.stack([r[0] for r in ranges]).amin(), torch.stack([r[1] for r in ranges]).amax()

    def _quantized_weight(self, name: str, module: nn.Module) -> torch.Tensor:
        if name not in self._weights:
            self._weights[name] = _as_module_layout(module, self.weight_operands(name, module)[1])
        return self._weights[name]

    def _weight_of(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """``w (O, I)`` as the scheme quantizes it: one sequence whose rows are the outputs."""
        target = self.scheme.target
        if target is not None:
            try:
                return targets.quantize_weight(w, target.weights, self._joint(name))[0]
            except ValueError as exc:
                raise KernelscopeError(f"{self.scheme.name} cannot quantize the weight of {name}: {exc}; "
                                       "keep it in full precision with --ignore") from None
        weight = self.scheme.weight_quantizer
        return w if weight is None else F.fake_quantize(w, weight.format)

    def _pre_hook(self, name: str):
        scheme = self.scheme
        untouched = not scheme.changes_activation and name not in self.transforms

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if args:
                x, rest = args[0], args[1:]
            else:
                return None
            xq = x if untouched else self._activation(name, x)
            if scheme.changes_weight:
                self._swapped[name] = (module, module.weight.data)
                module.weight.data = self._quantized_weight(name, module)
            return (xq, *rest), kwargs

        return hook

    def _post_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._restore(name)

        return hook

    def _restore(self, name: str) -> None:
        if name in self._swapped:
            module, original = self._swapped.pop(name)
            module.weight.data = original

    def __enter__(self) -> SchemeApplied:
        offloaded = [layer.name for layer in self.layers if layer.module.weight.device.type == "meta"]
        if self.scheme.changes_weight and offloaded:
            raise KernelscopeError(
                f"scheme {self.scheme.name} quantizes weights, but {len(offloaded)} layers (first "
                f"{offloaded[0]}) are offloaded to disk by the device map; give --max-memory more room, "
                "or use an activation-only scheme (fp, remove-kernel-*)"
            )
        try:
            for layer in self.layers:
                self._hooks.pre(layer.module, self._pre_hook(layer.name), with_kwargs=True)
                self._hooks.post(layer.module, self._post_hook(layer.name))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()
        for name in list(self._swapped):
            self._restore(name)
        self._weights.clear()
        self._last = (None, None, None)

    def end_batch(self) -> None:
        """Drop the reference to the last activation (call after each forward pass)."""
        self._last = (None, None, None)
