"""One preallocated block for the small results a forward pass leaves behind until it ends.

A profile keeps, for every Linear input of a batch, t, c and a few counts until the
forward pass is over. Allocated one by one, these long-lived crumbs land inside the large blocks the
model frees between layers, so the allocator can no longer reuse those blocks for the next layer's
activations and takes fresh memory instead: several hundred MiB on a 135M model. Placed in one
block made before the pass, they leave the model's memory pattern as it is without them.
"""

from __future__ import annotations

import math

import torch

_ALIGN = 64


class Arena:
    """``empty(shape, dtype)`` hands out a tensor inside the block; ``reset()`` frees them all at once.

    When the block is full, ``empty`` makes an ordinary tensor (correct, only without the benefit).
    """

    def __init__(self, nbytes: int, device: torch.device | str = "cpu") -> None:
        self.block = torch.empty(max(int(nbytes), 0), dtype=torch.uint8, device=device)
        self.used = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = self._take(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=self.block.device) if out is None else out

    def _take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        nbytes = math.prod(shape) * dtype.itemsize
        start = -(-self.used // _ALIGN) * _ALIGN
        if start + nbytes > self.block.numel():
            return None
        self.used = start + nbytes
        return self.block[start : start + nbytes].view(dtype).view(shape)

    def reset(self) -> None:
        self.used = 0
