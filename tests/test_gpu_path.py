"""The torch count is what a GPU runs (the C loops are CPU-only): inside a hook it must never wait for
the device, and it must compile into one graph. Both are checked here on the CPU."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

import kernelscope as ks
from kernelscope import element as E
from kernelscope.capture import hooks
from kernelscope.element import reference
from kernelscope.stats import HISTOGRAM
from tests.conftest import tiny_model

WAITING = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "bincount",
           "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "nanmedian"}
"""Operations that make the host wait for a GPU: a value read back, or an output whose size depends on
the data."""


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


class Waits(TorchFunctionMode):
    """Every torch call that would wait for the device, by name (boolean-mask indexing included)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _name(func)
        masks = [a for a in args[1:2] if isinstance(a, torch.Tensor) and a.dtype == torch.bool]
        tensor_repeats = name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor)
        if name in WAITING or (name in ("__getitem__", "__setitem__") and masks) or tensor_repeats:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def profile_watching_hooks(monkeypatch, configs, observer_extra=None) -> list[str]:
    """Profile a tiny model on the torch path, recording what waits inside the capture's hooks."""
    monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
    mode = Waits()
    made = hooks.LinearInputCapture._make_hook

    def make(self, name):
        hook = made(self, name)

        def watched(*args, **kwargs):
            with mode:
                if observer_extra is not None:
                    observer_extra(args[1][0])
                return hook(*args, **kwargs)

        return watched

    monkeypatch.setattr(hooks.LinearInputCapture, "_make_hook", make)
    windows = ks.make_windows(torch.arange(600) % 500, 64, 3)
    ks.profile(tiny_model("llama"), windows, configs, batch_size=2)
    return mode.seen


FORMATS = ["per_token", "crossquant", "per_tensor", "per_channel", "per_group", "fp8_per_token",
           "fp8_per_tensor", "mxfp8", "mxfp4", "mxfp4_rceil", "nvfp4"]


def test_no_hook_waits_for_the_device_on_the_torch_path(monkeypatch):
    configs = ks.expand_configs(FORMATS, [8, 4], [0.15], 32)
    assert profile_watching_hooks(monkeypatch, configs) == []


def test_the_watch_sees_a_value_read_back(monkeypatch):
    seen = profile_watching_hooks(monkeypatch, ks.default_configs(), lambda x: x.abs().max().item())
    assert seen and set(seen) == {"item"}


def test_the_torch_count_compiles_into_one_graph_with_the_same_counts(monkeypatch):
    monkeypatch.setenv("KERNELSCOPE_NATIVE", "0")
    torch._dynamo.reset()
    plan = E.make_plan(ks.expand_configs(["per_token", "nvfp4"], [8], [], None), HISTOGRAM)
    x = torch.randn(2, 16, 64) * torch.rand(1, 1, 64) * 4
    x[0, 3, 5] = float("nan")
    r = E.ranges(x)
    pairs = E.factors(r, plan)
    eager = reference.count(x, r, plan, pairs)
    compiled = torch.compile(reference.count, fullgraph=True, dynamic=False)(x, r, plan, pairs)
    for a, b in zip(E.fields(eager), E.fields(compiled), strict=True):
        assert torch.equal(a, b)
