"""Streaming accumulators of the kernel statistics: one per layer (:class:`KernelStats`), and the
accumulators of the layers of one input shape updated together (:class:`KernelStatsGroup`).

Counts add as integers, extremes as maxima and minima, and bound sums as exact sums, so a result
does not depend on how the windows were batched, checkpointed or split over processes. Everything
stays on the activation's device until the result is read (:mod:`kernelscope.stats.table`).
"""

from __future__ import annotations

from dataclasses import fields

import torch

from kernelscope.quant import QuantizerConfig
from kernelscope.stats.exact import ExactSum
from kernelscope.stats.observation import STATE_FIELDS, Observation, copy, fold, top_k


class KernelStats:
    """Streaming kernel statistics of one layer for a fixed list of quantizer configurations.

    Counts add as integers, extremes as maxima and minima, and bound sums as :class:`ExactSum`, so
    the result does not depend on how the windows were batched, checkpointed or split over processes.
    """

    _FLUSH = 64  # per-sequence bound sums kept on the device before they are folded into the exact sums

    def __init__(self, configs: list[QuantizerConfig], top_k: int = 10) -> None:
        self.configs = list(configs)
        self.top_k = top_k
        self.state: Observation | None = None
        self.bound_sums = ExactSum(len(self.configs))
        # (C, >= _FLUSH) float64: per-sequence bound sums not yet added
        self._held: torch.Tensor | None = None
        self._filled = 0  # columns of _held in use
        self._group: KernelStatsGroup | None = None  # the group whose stacked state this state is a row of

    def flush(self) -> None:
        """Fold the per-sequence bound sums kept on the device into the exact sums (one host sync)."""
        if self._group is not None:
            self._group.flush()
        if self._filled:
            self.bound_sums.add(self._held[:, : self._filled])  # (C, filled)
            self._filled = 0

    def _hold(self, sums: torch.Tensor) -> None:
        """Keep ``sums (C, B)`` until the next flush, in one buffer made once: an accumulator allocates
        nothing after its first batch, so it never leaves small blocks among a model's activations."""
        width = sums.shape[1]
        if self._held is None or self._held.shape[1] < width or self._held.device != sums.device:
            self.flush()
            self._held = torch.empty(len(self.configs), max(self._FLUSH, width), dtype=torch.float64,
                                     device=sums.device)
        elif self._filled + width > self._held.shape[1]:
            self.flush()
        self._held[:, self._filled : self._filled + width].copy_(sums)
        self._filled += width

    def update(self, obs: Observation) -> KernelStats:
        """Add one observation (made with the same configs, in the same order)."""
        if obs.kernel.shape[0] != len(self.configs):
            raise ValueError("the observation was made with a different number of configurations")
        self._hold(obs.bound_sum.detach())
        if self.state is None:
            self._detach()
            self.state = copy(obs)
            self.state.bound_sum = torch.empty(0, dtype=torch.float64)  # held in self.bound_sums
            self.state.top_values, self.state.top_index = top_k(obs.top_values, obs.top_index, self.top_k)
            return self
        self._fold(obs)
        return self

    def _fold(self, obs: Observation) -> None:
        if not fold(self.state, obs, self.top_k):
            self._detach()  # its top tokens are new tensors: the state stops being a row of a group's

    def _detach(self) -> None:
        """Stop being a row of a :class:`KernelStatsGroup` (whose held bound sums are folded in first)."""
        if self._group is not None:
            group, self._group = self._group, None
            group.flush()

    def top_from(self, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k of candidate tokens ``values (n,)`` at ``index (n,)``, ties to the earlier token."""
        return top_k(values, index, self.top_k)

    def merge(self, other: KernelStats) -> KernelStats:
        """Fold another accumulator of the same layer and configs into this one."""
        if other.configs != self.configs:
            raise ValueError("cannot merge statistics of different quantizer configurations")
        if other.state is None:
            return self
        self.flush()
        other.flush()
        if self.state is None:
            self._detach()
            self.state = copy(other.state)
        else:
            self._fold(other.state)
        self.bound_sums.merge(other.bound_sums)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulated state as CPU tensors (empty when nothing was observed), for checkpoints."""
        if self.state is None:
            return {}
        self.flush()
        state = {f.name: getattr(self.state, f.name).detach().cpu() for f in fields(self.state)}
        state["bound_sum"] = self.bound_sums.to_tensor()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor],
                        device: torch.device | str = "cpu") -> KernelStats:
        """Restore what :meth:`state_dict` returned; the next update continues exactly from there."""
        self._detach()
        self._filled = 0
        if not state:
            self.state = None
            self.bound_sums = ExactSum(len(self.configs))
            return self
        missing = {f.name for f in fields(Observation)} - set(state)
        if missing:
            raise ValueError(f"state lacks {sorted(missing)}")
        self.bound_sums = ExactSum.from_tensor(state["bound_sum"])
        if len(self.bound_sums.totals) != len(self.configs):
            raise ValueError("the saved state was made with a different number of configurations")
        self.state = Observation(**{f.name: state[f.name].to(device) for f in fields(Observation)})
        self.state.bound_sum = torch.empty(0, dtype=torch.float64)
        return self

    @property
    def empty(self) -> bool:
        return self.state is None

    def on_host(self) -> Observation:
        """The accumulated state on the CPU, pending bound sums folded in."""
        if self.state is None:
            raise ValueError("no data was observed for this layer")
        self.flush()
        return Observation(**{f.name: getattr(self.state, f.name).cpu() for f in fields(self.state)})


class KernelStatsGroup:
    """The accumulators of several layers whose inputs have one shape, updated together from one
    stacked observation (:func:`summarise_groups`): a few dozen tensor operations a batch in all,
    rather than a few dozen per layer (on a GPU, as many kernel launches). The result is the same as
    updating each layer's accumulator alone.

    After the first batch, each accumulator's state is a row of the group's stacked state (views),
    so everything that reads, saves or merges a :class:`KernelStats` works as before. An accumulator
    changed on its own in a way that replaces its state (a load, a first merge) leaves the group; the
    next update then adds the batch layer by layer and stacks the states again.
    """

    def __init__(self, accumulators: list[KernelStats]) -> None:
        if not accumulators:
            raise ValueError("a group needs at least one accumulator")
        first = accumulators[0]
        if any(acc.configs != first.configs or acc.top_k != first.top_k for acc in accumulators):
            raise ValueError("a group's accumulators must have the same configurations and top_k")
        self.accumulators = list(accumulators)
        self.state: Observation | None = None  # fields (layers, ...); bound_sum (layers, 0): see _held
        self._held: torch.Tensor | None = None  # (layers, C, >= _FLUSH) float64: bound sums not yet added
        self._filled = 0

    def update(self, obs: Observation) -> KernelStatsGroup:
        """Add a stacked observation whose layer ``j`` belongs to ``accumulators[j]``."""
        layers, n = len(self.accumulators), len(self.accumulators[0].configs)
        if tuple(obs.kernel.shape) != (layers, n):
            raise ValueError(f"expected an observation of {layers} layers x {n} configurations, "
                             f"got {tuple(obs.kernel.shape)}")
        if not self._stacked():
            # the first batch: the state is the batch's
            if all(acc.state is None for acc in self.accumulators):
                state = {name: getattr(obs, name).clone() for name in STATE_FIELDS}  # (layers, ...) each
                state["top_values"], state["top_index"] = top_k(obs.top_values, obs.top_index,
                                                                 self.accumulators[0].top_k)
                self._bind(state)
                self._hold(obs.bound_sum.detach())
                return self
            for j, acc in enumerate(self.accumulators):
                acc.update(obs.layer(j))
            self._stack()
            return self
        s = self.state
        if not fold(s, obs, self.accumulators[0].top_k):  # new top-token tensors: rows of them
            for j, acc in enumerate(self.accumulators):
                acc.state.top_values, acc.state.top_index = s.top_values[j], s.top_index[j]
        self._hold(obs.bound_sum.detach())
        return self

    def _stacked(self) -> bool:
        return self.state is not None and all(acc._group is self for acc in self.accumulators)

    def _stack(self) -> None:
        """Make each accumulator's state a row of one stacked state (where their shapes allow)."""
        states = [acc.state for acc in self.accumulators]
        shapes = [tuple(getattr(st, name).shape for name in STATE_FIELDS) for st in states]
        if any(shape != shapes[0] for shape in shapes):
            self.state = None  # e.g. top-k lists of different lengths: stay layer by layer
            return
        # (layers, ...) each
        self._bind({name: torch.stack([getattr(st, name) for st in states]) for name in STATE_FIELDS})

    def _bind(self, stacked: dict[str, torch.Tensor]) -> None:
        """Take ``stacked`` (every field but the bound sums) as the group's state, each accumulator's
        state becoming its row."""
        for acc in self.accumulators:
            acc._detach()
        self.flush()
        self.state = Observation(**stacked,
                                 bound_sum=torch.empty(len(self.accumulators), 0, dtype=torch.float64))
        for j, acc in enumerate(self.accumulators):
            acc.state = self.state.layer(j)
            acc._group = self

    def _hold(self, sums: torch.Tensor) -> None:
        """Keep ``sums (layers, C, B)`` until the next flush, in one buffer made once."""
        width = sums.shape[-1]
        if self._held is None or self._held.shape[-1] < width or self._held.device != sums.device:
            self.flush()
            self._held = torch.empty(*sums.shape[:2], max(KernelStats._FLUSH, width), dtype=torch.float64,
                                     device=sums.device)
        elif self._filled + width > self._held.shape[-1]:
            self.flush()
        self._held[:, :, self._filled : self._filled + width].copy_(sums)
        self._filled += width

    def flush(self) -> None:
        """Fold the bound sums held for every layer into its accumulator's exact sums (one host sync)."""
        if self._filled:
            rows = self._held[:, :, : self._filled].cpu().tolist()  # (layers, C, filled)
            self._filled = 0
            for acc, row in zip(self.accumulators, rows, strict=True):
                acc.bound_sums.add(row)

    def release(self) -> None:
        """Fold in the held bound sums and let every accumulator go on alone (its state stays as is)."""
        self.flush()
        for acc in self.accumulators:
            if acc._group is self:
                acc._group = None
