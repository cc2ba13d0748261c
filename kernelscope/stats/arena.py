"""One preallocated block for the small results a forward pass leaves behind until it ends.

A profile keeps, for every Linear input of a batch, a few vectors (t, c, steps, counts) until the
forward pass is over. Allocated one by one, these long-lived crumbs land inside the large blocks the
model frees between layers, so the allocator can no longer reuse those blocks for the next layer's
activations and takes fresh memory instead: several hundred MiB on a 135M model. Copied into one
block made before the pass, they leave the model's memory pattern as it is without them.
"""

from __future__ import annotations

import torch

_ALIGN = 64


class Arena:
    """``keep(t)`` copies ``t`` into the block and returns the copy; ``reset()`` frees it all at once.

    When the block is full, ``keep`` returns ``t`` itself (correct, only without the benefit) and
    :attr:`needed` says how large the block should have been.
    """

    def __init__(self, nbytes: int, device: torch.device | str = "cpu") -> None:
        self.block = torch.empty(max(int(nbytes), 0), dtype=torch.uint8, device=device)
        self.used = 0
        self.needed = 0

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        start = -(-self.used // _ALIGN) * _ALIGN
        self.needed = max(self.needed, start + nbytes)
        if start + nbytes > self.block.numel() or t.device != self.block.device:
            return t
        self.used = start + nbytes
        out = self.block[start : start + nbytes].view(t.dtype).view(t.shape)
        return out.copy_(t)

    def reset(self) -> None:
        self.used = 0
