"""Cut one tokenized text into non-overlapping windows of ``seqlen`` tokens.

Example: 1,030 tokens with ``seqlen=256`` hold 4 windows, starting at tokens 0, 256, 512 and 768;
the last 6 tokens are dropped. ``selection="first"`` with ``nsamples=2`` takes the windows at 0 and
256 (text order, as the perplexity protocol does); ``selection="random"`` takes 2 of the 4 drawn
without replacement by a generator seeded with ``seed``, kept in text order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from kernelscope.errors import KernelscopeError

SELECTIONS = ("first", "random")


@dataclass(frozen=True)
class Windows:
    """Selected windows ``tokens (n, seqlen)`` and how they were chosen."""

    tokens: torch.Tensor  # (n, seqlen) int64
    starts: list[int]  # token offset of each window in the whole text
    seqlen: int
    available: int  # non-overlapping windows the text holds
    total_tokens: int
    selection: str
    seed: int
    part: str | None = None  # "selection" or "held-out" after :meth:`split`
    chosen: int | None = None  # how many windows were chosen before the split

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def split(self, n: int) -> tuple[Windows, Windows]:
        """The first ``n`` windows (in text order) to choose on, and the rest to check the choice on:
        two disjoint sets of the same text."""
        if not 0 < n < len(self):
            raise ValueError(f"cannot split {len(self)} windows at {n}")

        def part(name: str, rows: slice) -> Windows:
            return dataclasses.replace(self, tokens=self.tokens[rows], starts=self.starts[rows], part=name,
                                       chosen=len(self))

        return part("selection", slice(0, n)), part("held-out", slice(n, None))

    @property
    def dropped_tokens(self) -> int:
        return self.total_tokens - self.available * self.seqlen

    @property
    def sha256(self) -> str:
        """Fingerprint of the exact token ids fed to the model."""
        return hashlib.sha256(self.tokens.to(torch.int64).numpy().tobytes()).hexdigest()

    def describe(self) -> str:
        """One sentence for the run summary."""
        n = len(self)
        if self.selection == "first":
            how = "all of them" if n == self.available else f"the first {n}, in text order"
        else:
            how = f"{n} drawn at random without replacement (seed {self.seed}), kept in text order"
        if self.part is not None:
            chosen = self.chosen or n
            how = (f"the {self.part} part of the {'first' if self.selection == 'first' else 'random'} "
                   f"{chosen} chosen: windows at token offsets {self.starts[0]:,} to {self.starts[-1]:,}")
        return (
            f"{n} of {self.available} non-overlapping {self.seqlen}-token windows ({how}); "
            f"text of {self.total_tokens:,} tokens, last {self.dropped_tokens:,} dropped"
        )

    def as_dict(self) -> dict:
        return {
            "windows": len(self), "seqlen": self.seqlen, "available_windows": self.available,
            "total_tokens": self.total_tokens, "dropped_tokens": self.dropped_tokens,
            "selection": self.selection, "seed": self.seed, "part": self.part, "starts": self.starts,
            "tokens_sha256": self.sha256, "description": self.describe(),
        }


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one sequence of ids ``(N,)``, special tokens as the tokenizer adds them."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def make_windows(
    ids: torch.Tensor,
    seqlen: int,
    nsamples: int | None = None,
    *,
    selection: str = "first",
    seed: int = 0,
    names: tuple[str, str, str] = ("text", "--nsamples", "--seqlen"),
) -> Windows:
    """Select ``nsamples`` (all when None) non-overlapping windows of ``seqlen`` tokens from ``ids (N,)``.

    ``names``: how errors name the text, the window count and the window length (the command-line
    options that gave them)."""
    text, nsamples_name, seqlen_name = names
    if seqlen < 1:
        raise KernelscopeError(f"{seqlen_name} must be at least 1, got {seqlen}")
    if nsamples is not None and nsamples < 1:
        raise KernelscopeError(f"{nsamples_name} must be at least 1, got {nsamples}")
    if selection not in SELECTIONS:
        raise KernelscopeError(f"unknown window selection {selection!r}; choose {' or '.join(SELECTIONS)}")
    total = ids.numel()
    available = total // seqlen
    if available == 0:
        raise KernelscopeError(
            f"the {text} has {total} tokens, fewer than one window of {seqlen_name} {seqlen}")
    n = available if nsamples is None else nsamples
    if n > available:
        raise KernelscopeError(
            f"{nsamples_name} {n} asks for more windows than the {available} of {seqlen} tokens "
            f"the {text} holds"
        )
    if selection == "first":
        chosen = list(range(n))
    else:
        gen = torch.Generator().manual_seed(seed)
        chosen = sorted(torch.randperm(available, generator=gen)[:n].tolist())
    grid = ids[: available * seqlen].view(available, seqlen)  # (available, seqlen)
    tokens = grid[chosen].clone()  # (n, seqlen)
    return Windows(tokens, [i * seqlen for i in chosen], seqlen, available, total, selection, seed)
