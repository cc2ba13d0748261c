"""Data-parallel profiling on torch.distributed: each process takes its share of the windows, and the
streaming statistics are merged exactly (counts and histograms summed, extremes by max/min, top-k
gathered, bound sums exactly). Launch with ``torchrun --nproc-per-node N -m kernelscope profile ...``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernelscope.stats import KernelStats, Observation
from kernelscope.stats.exact import ExactSum
from kernelscope.stats.observation import MAXIMA, MINIMA, SUMMED

_REDUCE = {**dict.fromkeys(SUMMED, dist.ReduceOp.SUM), **dict.fromkeys(MAXIMA, dist.ReduceOp.MAX),
           **dict.fromkeys(MINIMA, dist.ReduceOp.MIN)}
"""How each field of an accumulator's state is reduced over processes."""


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` (0 of 1 without torch.distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def windows(self, n: int) -> range:
        """The windows this process runs: its contiguous share of ``n``, the first ranks taking one
        more when ``n`` does not divide evenly."""
        share, extra = divmod(n, self.size)
        first = self.rank * share + min(self.rank, extra)
        return range(first, first + share + (self.rank < extra))


def launched() -> bool:
    """True when started by torchrun (or anything that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> World:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); no-op alone."""
    if not launched():
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def current() -> World:
    """The world of an initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def merge_stats(accumulators: Iterable[KernelStats], device: torch.device) -> None:
    """Make every process's accumulators the merge of all processes' (in place, same on every rank).

    Every rank must pass the same layers in the same order, each having observed at least one batch.
    """
    world = current()
    if world.size == 1:
        return
    for acc in accumulators:
        state: Observation = _reduced(acc, _REDUCE, device)
        # Ranks may hold fewer than k tokens; pad to k (index -1 marks padding) so shapes agree.
        pad = acc.top_k - state.top_values.numel()
        mine_values = torch.nn.functional.pad(state.top_values.float(), (0, pad), value=-1.0).to(device)
        mine_index = torch.nn.functional.pad(state.top_index, (0, pad), value=-1).to(device)
        values = [torch.empty_like(mine_values) for _ in range(world.size)]
        index = [torch.empty_like(mine_index) for _ in range(world.size)]
        dist.all_gather(values, mine_values)
        dist.all_gather(index, mine_index)
        state.top_values, state.top_index = acc.top_from(torch.cat(values).cpu(), torch.cat(index).cpu())
        acc.flush()
        acc.bound_sums = _gathered_sum(acc.bound_sums, world.size)


def merge_counts(counts: dict, device: torch.device) -> None:
    """Make each count the sum of all processes' (in place; every rank holds the same keys)."""
    world = current()
    if world.size == 1 or not counts:
        return
    keys = sorted(counts)
    stacked = torch.stack([counts[k].to(device) for k in keys])  # (K,)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    counts.update(zip(keys, stacked, strict=True))


def _reduced(acc: KernelStats, reductions: dict[str, dist.ReduceOp], device: torch.device):
    """``acc``'s state with each field named in ``reductions`` reduced over all processes, in place."""
    state = acc.state
    if state is None:
        raise RuntimeError("a process observed no window; use at least as many windows as processes")
    for name, op in reductions.items():
        value = getattr(state, name).to(device)
        dist.all_reduce(value, op=op)
        setattr(state, name, value.to(getattr(state, name).device))
    return state


def _gathered_sum(mine: ExactSum, size: int) -> ExactSum:
    """The exact sums of all processes added: integers, so the order of addition cannot matter."""
    totals: list[list[int] | None] = [None] * size
    dist.all_gather_object(totals, mine.totals)
    merged = ExactSum(len(mine.totals))
    merged.totals = [sum(column) for column in zip(*totals, strict=True)]
    return merged
