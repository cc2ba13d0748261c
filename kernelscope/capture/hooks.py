"""Forward hooks that last for a ``with`` block only: :class:`ForwardHooks` for any pre- or post-forward
hook on any module, :class:`LinearInputCapture` to see the input of selected Linear layers.

Every hook the package attaches goes through here, so that each is removed on exit, error or not."""

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


class ForwardHooks:
    """Pre- and post-forward hooks on any modules, all removed together, error or not.

    ``with ForwardHooks() as hooks: hooks.pre(module, fn); hooks.post(module, fn); model(x)``: each
    hook runs as torch runs it (a pre-hook may return a new input, a post-hook a new output) until
    the block ends. An object that is itself a context manager may hold one and call :meth:`remove`
    on its own exit.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre(self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        """Run ``hook(module, args[, kwargs])`` before each forward of ``module``."""
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def post(self, module: nn.Module, hook: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        """Run ``hook(module, args[, kwargs], output)`` after each forward of ``module``."""
        self._handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))

    def remove(self) -> None:
        """Detach every hook attached through this object, the last first (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    @property
    def attached(self) -> bool:
        """True while any hook attached through this object is in place."""
        return bool(self._handles)

    def __enter__(self) -> ForwardHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


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
        self._hooks = ForwardHooks()

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, torch.Tensor):
                self.observer(name, x)

        return hook

    def __enter__(self) -> LinearInputCapture:
        if self._hooks.attached:
            raise RuntimeError("this capture is already attached")
        try:
            for name, module in self.modules.items():
                self._hooks.pre(module, self._make_hook(name), with_kwargs=True)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Detach every hook this capture attached (idempotent)."""
        self._hooks.remove()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def attached(self) -> bool:
        return self._hooks.attached
