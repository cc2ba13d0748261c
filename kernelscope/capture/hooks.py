"""A context manager that sees the input of selected Linear layers and always detaches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

try:  # GPT-2 style layers keep their weight transposed, (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment,misc]


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (the same map, weight transposed)."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_in_features(module: nn.Module) -> int:
    """Number of input channels of a Linear-like module."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return int(module.weight.shape[0])  # Conv1D: (in, out)


Observer = Callable[[str, torch.Tensor], None]
"""Called as ``observer(name, x)`` with the module's name and its input, before it runs."""


class LinearInputCapture:
    """Attach ``observer`` to the input of each named module; detach on exit, error or not.

    ``with LinearInputCapture(model, {"model.layers.0.mlp.up_proj": module, ...}, fn) as cap:``
    runs ``fn(name, x)`` before each of those modules' forward. The observer must not modify ``x``;
    nothing else about the model changes. Scoped to one model, re-entrant only after exit.
    """

    def __init__(self, modules: dict[str, nn.Module] | Iterable[tuple[str, nn.Module]],
                 observer: Observer) -> None:
        self.modules = dict(modules)
        self.observer = observer
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, torch.Tensor):
                self.observer(name, x)

        return hook

    def __enter__(self) -> LinearInputCapture:
        if self._handles:
            raise RuntimeError("this capture is already attached")
        try:
            for name, module in self.modules.items():
                self._handles.append(
                    module.register_forward_pre_hook(self._make_hook(name), with_kwargs=True)
                )
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Detach every hook this capture attached (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def attached(self) -> bool:
        return bool(self._handles)
