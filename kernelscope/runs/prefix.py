"""Start a forward pass at decoder block b, from the block outputs of one full-precision pass.

When a scheme touches only the layers of blocks ``>= b``, blocks ``0 .. b-1`` compute exactly what
they computed in the full-precision pass. :class:`BlockOutputs` keeps a copy of every block's output
from that pass (one per batch, in order) and, inside :meth:`BlockOutputs.starting_at`, makes the
blocks before ``b`` hand back their recorded output instead of computing it. The embedding, the
blocks from ``b`` on and the output head run as usual, so the result is the one a full pass gives,
bit for bit (same batches, same kernels), at the cost of the blocks that really run.

Memory: one hidden state per block, window and position, ``blocks × windows × seqlen × hidden``
elements of the model's dtype (the demo at 2 × 1024: 30 × 2 × 1024 × 576 × 4 B = 141 MB). Past
``limit_bytes`` nothing is kept and every pass runs whole. A model under an accelerate device map,
or whose blocks already carry an instance ``forward`` (another wrapper), is always run whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from kernelscope.capture import ForwardHooks
from kernelscope.models import find_decoder_blocks

DEFAULT_LIMIT_BYTES = 2 * 2**30


def _copy(output: Any) -> Any | None:
    """A detached copy of a block's output (a tensor, or a tuple/list of tensors and None); None
    for a structure this replay does not handle."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, (tuple, list)) and all(o is None or isinstance(o, torch.Tensor) for o in output):
        return type(output)(None if o is None else o.detach().clone() for o in output)
    return None


def _nbytes(output: Any) -> int:
    parts = output if isinstance(output, (tuple, list)) else (output,)
    return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))


def _leading(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    return next((o for o in output if isinstance(o, torch.Tensor)), None)


class BlockOutputs:
    """Every decoder block's output over one pass, replayed so a later pass can start at a block."""

    def __init__(self, model: nn.Module, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> None:
        found = find_decoder_blocks(model)
        self.blocks: list[nn.Module] = list(found[1]) if found else []
        self.limit_bytes = limit_bytes
        self.nbytes = 0
        self.reason: str | None = None
        if getattr(model, "hf_device_map", None):
            self.reason = "the model is spread by a device map"
        elif not self.blocks:
            self.reason = "no decoder blocks were found"
        elif any("forward" in vars(block) for block in self.blocks):
            self.reason = "the decoder blocks are wrapped by another library"
        self._outputs: list[list[Any]] = [[] for _ in self.blocks]
        self._recorded = False

    @property
    def ready(self) -> bool:
        """True when a pass may start past block 0."""
        return self._recorded and self.reason is None

    def _drop(self, reason: str) -> None:
        self.reason = reason
        self._outputs = [[] for _ in self.blocks]
        self.nbytes = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[BlockOutputs]:
        """Keep a copy of each block's output during the ``with`` block (one full pass)."""
        if self.reason is not None:
            yield self
            return

        def hook_for(i: int):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if self.reason is not None:
                    return
                kept = _copy(output)
                if kept is None:
                    self._drop("the decoder blocks return a structure the replay does not handle")
                    return
                self.nbytes += _nbytes(kept)
                if self.nbytes > self.limit_bytes:
                    self._drop(f"the block outputs would take more than {self.limit_bytes / 2**30:.1f} GiB")
                    return
                self._outputs[i].append(kept)

            return hook

        with ForwardHooks() as hooks:
            for i, block in enumerate(self.blocks):
                hooks.post(block, hook_for(i))
            yield self
            self._recorded = True

    @contextlib.contextmanager
    def starting_at(self, first: int) -> Iterator[int]:
        """Inside the block, blocks ``< first`` return their recorded outputs, batch by batch in the
        order recorded; yields the first block that really runs (0 when the replay is not ready).
        Every block's own ``forward`` is back on exit, error or not."""
        if first <= 0 or not self.ready:
            yield 0
            return
        first = min(first, len(self.blocks))
        served = [0] * first
        try:
            for i in range(first):
                self.blocks[i].forward = self._stub(i, served, last=i == first - 1)
            yield first
        finally:
            for i in range(first):
                vars(self.blocks[i]).pop("forward", None)

    def _stub(self, i: int, served: list[int], *, last: bool):
        outputs = self._outputs[i]

        def forward(*args: Any, **kwargs: Any) -> Any:
            if served[i] >= len(outputs):
                raise RuntimeError("a pass asked for more batches than the full-precision pass recorded")
            out = outputs[served[i]]
            served[i] += 1
            x = args[0] if args else kwargs.get("hidden_states")
            head = _leading(out)
            if isinstance(x, torch.Tensor) and head is not None and x.shape != head.shape:
                raise RuntimeError("the recorded block outputs do not match this pass's batches")
            return _copy(out) if last else out  # the next block that runs gets a copy of its own

        return forward
