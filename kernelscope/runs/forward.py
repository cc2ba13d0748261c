"""Running a causal LM over windows without generation state, leaving the model as it was found."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device inputs go to: the first module's under a device map (the CPU for one offloaded to
    disk), otherwise the first parameter's."""
    hf_map = getattr(model, "hf_device_map", None)
    if hf_map:
        first = next(iter(hf_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        return torch.device("cpu" if first in ("cpu", "disk") else first)
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd for the block; the model's own training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def attention(model: nn.Module, implementation: str | None) -> Iterator[nn.Module]:
    """The model's attention computed by ``implementation`` (``eager``, ``sdpa``; None: its own) for the
    block, as a deploying library's calibration runs it; the model's own choice restored after."""
    config = getattr(model, "config", None)
    if implementation is None or config is None or not hasattr(config, "_attn_implementation"):
        yield model
        return
    own = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield model
    finally:
        config._attn_implementation = own


def forward_windows(model: nn.Module, tokens: torch.Tensor, *, all_logits: bool = False):
    """One forward pass over ``tokens (B, T)``; without ``all_logits`` only the last position's
    logits are computed where the model allows it, which saves a (B, T, vocab) tensor."""
    kwargs = {"input_ids": tokens.to(model_device(model)), "use_cache": False}
    if not all_logits and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return model(**kwargs)
