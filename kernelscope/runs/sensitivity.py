"""``sensitivity``: which groups of Linear layers a scheme hurts, and how much of it their kernel does.

For a target scheme S and each group of layers — each module type (layers fed the same tensor, as
q/k/v and gate/up are, form one group, found by watching the inputs), each decoder block, and on
request each layer — three figures on the same windows:

- the loss when only that group is quantized under S (``delta_nll``: mean NLL minus fp's, the change
  in log perplexity, with its paired bootstrap interval);
- the loss when only that group's kernel is removed (the remove-kernel scheme of S's activation
  quantizer, weights in full precision: ``kernel_delta_nll``), and so the share of the group's loss its
  kernel explains (``kernel_share``);
- in the same passes, the mean KL divergence ``KL(p_fp || p_S)`` of the next-token distribution from
  full precision, in nats per predicted token (``kl``).

Work is reused: one full-precision pass gives the reference perplexity, the reference
log-probabilities for the KL, the inputs that layers share, and every block's output, so that a group
whose first layer sits in block b starts its pass there (:mod:`kernelscope.runs.prefix`). The model is
never reloaded; every pass leaves it as found.

Memory: the reference log-probabilities are kept whole, ``windows × (seqlen - 1) × vocab`` float32 on
the model's device (the demo at 2 × 1024: 2 × 1023 × 49152 × 4 B = 402 MB), and the KL is computed from
them in chunks of positions (two temporaries of 64 MB each). They are exact; a top-k truncation would bias the
small divergences that rank the groups, so none is offered.

Cost is counted in full-pass equivalents (:func:`pass_cost`): a pass from block b costs the share of
the model's Linear multiply-adds in blocks ``>= b`` plus those outside the blocks (the output head).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import torch
from torch import nn

from kernelscope.capture import LinearInputCapture, is_linear
from kernelscope.data import TextSource, Windows
from kernelscope.models import LinearLayer, LoadedModel, find_decoder_blocks
from kernelscope.quant import targets
from kernelscope.quant.modes import Mode
from kernelscope.quant.transforms import IDENTITY, TransformSpec
from kernelscope.runs.common import (
    StageProgress,
    TableResult,
    resolve_layers,
    run_context,
    stage_callback,
    unpack,
)
from kernelscope.runs.evaluate import calibrate_target, compare, protocol_text, run_scheme, scheme_transform
from kernelscope.runs.prefix import DEFAULT_LIMIT_BYTES, BlockOutputs
from kernelscope.runs.schemes import Scheme
from kernelscope.runs.transforming import ModelTransform, TransformBinder, identity_transform
from kernelscope.stats.uncertainty import METHOD, ratio_interval

GROUP_KINDS = ("module_type", "block", "layer")
"""Kinds of group, coarse to fine."""
KL_CHUNK_ELEMENTS = 2**24
"""Logits per chunk of the KL computation (64 MB of float32)."""


def kernel_scheme(scheme: Scheme) -> Scheme:
    """The remove-kernel scheme of ``scheme``'s activation quantizer: only its kernel zeroed, every
    other element (and the weights) in full precision; the scheme's own transform (SmoothQuant's) kept,
    since its kernel is the kernel of the transformed input."""
    if scheme.target is not None and scheme.target.quantizes_activations:
        return Scheme(f"remove-kernel of {scheme.name}", Mode.REMOVE_KERNEL, target=scheme.target,
                      transform=scheme.transform)
    if scheme.activation is None:
        raise ValueError(f"scheme {scheme.name} quantizes no activation, so it has no kernel")
    return Scheme(f"remove-kernel of {scheme.name}", Mode.REMOVE_KERNEL, scheme.activation,
                  transform=scheme.transform)


# -- groups ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """A set of layers quantized (or kernel-removed) together in one sensitivity pass."""

    kind: str
    name: str
    layers: tuple[LinearLayer, ...]

    @property
    def first_block(self) -> int:
        """The first block a pass must compute (0 when a layer lies outside the blocks)."""
        blocks = [layer.block for layer in self.layers]
        return 0 if any(b is None for b in blocks) else min(blocks)

    @property
    def parameters(self) -> int:
        return sum(layer.module.weight.numel() for layer in self.layers)


def shared_input_sets(order: list[str], same_as_previous: list[bool]) -> list[list[str]]:
    """Layers in call order, cut wherever a layer's input is not the tensor the previous layer got."""
    sets: list[list[str]] = []
    for name, same in zip(order, same_as_previous, strict=True):
        if same and sets:
            sets[-1].append(name)
        else:
            sets.append([name])
    return sets


def make_groups(selected: list[LinearLayer], shared: list[list[str]], kinds: Sequence[str]) -> list[Group]:
    """The groups of each kind: module types (one group per set of types that share an input, over
    all blocks), blocks, layers; in module order within each kind."""
    by_name = {layer.name: layer for layer in selected}
    seen = {name for names in shared for name in names}
    sets = [names for names in shared if all(n in by_name for n in names)]
    sets += [[layer.name] for layer in selected if layer.name not in seen]  # never called: on its own
    groups: list[Group] = []
    if "module_type" in kinds:
        types: dict[tuple[str, ...], list[LinearLayer]] = {}
        for names in sets:
            key = tuple(by_name[n].module_type for n in names)
            types.setdefault(key, []).extend(by_name[n] for n in names)
        order = {layer.name: i for i, layer in enumerate(selected)}
        for key, members in sorted(types.items(), key=lambda kv: min(order[m.name] for m in kv[1])):
            members.sort(key=lambda m: order[m.name])
            groups.append(Group("module_type", "+".join(key), tuple(members)))
    if "block" in kinds:
        blocks = sorted({layer.block for layer in selected if layer.block is not None})
        groups += [Group("block", f"block {b}", tuple(lay for lay in selected if lay.block == b))
                   for b in blocks]
    if "layer" in kinds:
        groups += [Group("layer", layer.name, (layer,)) for layer in selected]
    return groups


# -- cost -----------------------------------------------------------------------------------------

def linear_costs(model: nn.Module) -> tuple[dict[int | None, int], int]:
    """Multiply-adds per token of the model's Linear layers by block (None: outside the blocks)."""
    found = find_decoder_blocks(model)
    prefix = found[0] + "." if found else None
    per_block: dict[int | None, int] = {}
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        block = None
        if prefix and name.startswith(prefix):
            index = name[len(prefix):].partition(".")[0]
            block = int(index) if index.isdigit() else None
        per_block[block] = per_block.get(block, 0) + module.weight.numel()
    return per_block, sum(per_block.values())


def pass_cost(costs: tuple[dict[int | None, int], int], first_block: int) -> float:
    """A pass that starts at ``first_block`` in full-pass equivalents: the share of Linear
    multiply-adds it performs (attention products and norms are not counted; they are a larger share
    of the blocks that are skipped, so this overstates a partial pass, never understates it)."""
    per_block, total = costs
    done = sum(c for b, c in per_block.items() if b is None or b >= first_block)
    return done / total if total else 1.0


# -- the probe: one model, one set of windows, one reference ----------------------------------------

class _Reference:
    """``on_logits`` of the full-precision pass: keeps log-probabilities ``(W, T-1, V)`` float32."""

    def __init__(self, windows: int) -> None:
        self.windows = windows
        self.logprobs: torch.Tensor | None = None

    def __call__(self, first: int, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        b, t, v = logits.shape
        if self.logprobs is None:
            self.logprobs = torch.empty((self.windows, t - 1, v), dtype=torch.float32, device=logits.device)
        step = max(1, KL_CHUNK_ELEMENTS // (b * v))
        for s in range(0, t - 1, step):
            e = min(s + step, t - 1)
            self.logprobs[first : first + b, s:e] = torch.log_softmax(logits[:, s:e].float(), dim=-1)


class _Divergence:
    """``on_logits`` of a probed pass: summed ``KL(p_ref || p)`` per window, ``(W,)`` float64."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference = reference  # (W, T-1, V)
        self.sums = torch.zeros(reference.shape[0], dtype=torch.float64)

    def __call__(self, first: int, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        b, t, v = logits.shape
        step = max(1, KL_CHUNK_ELEMENTS // (b * v))
        total = torch.zeros(b, dtype=torch.float64, device=logits.device)
        for s in range(0, t - 1, step):
            e = min(s + step, t - 1)
            ref = self.reference[first : first + b, s:e]  # (b, c, V)
            gap = torch.log_softmax(logits[:, s:e].float(), dim=-1).sub_(ref).neg_()  # log p - log q
            total += torch.linalg.vecdot(ref.exp(), gap).sum(dim=1).double()  # Σ_v p (log p - log q)
        self.sums[first : first + b] = total.cpu()

    def per_window(self, positions: int) -> list[float]:
        return (self.sums / positions).tolist()


class Probe:
    """Measures schemes on subsets of ``selected`` over ``windows``: each :meth:`measure` is one pass
    (from the first block it touches, once :meth:`reference` has run), its row carrying the per-window
    NLL, the KL from the reference, its cost in full-pass equivalents and its time."""

    def __init__(self, model: nn.Module, windows: Windows, selected: list[LinearLayer], *,
                 transform: ModelTransform | None = None, batch_size: int = 1,
                 progress: StageProgress | None = None,
                 prefix_limit_bytes: int = DEFAULT_LIMIT_BYTES,
                 calibration: dict[str, targets.Calibration] | None = None) -> None:
        self.model = model
        self.calibration = calibration  # a target's static scales, for every layer
        self.static_scales: dict[str, Any] | None = None  # what the summary records of them
        self.windows = windows
        self.selected = selected
        self.transform = transform  # the basis every measured scheme quantizes in (None: the model's own)
        self.batch_size = batch_size
        self.progress = progress
        self.costs = linear_costs(model)
        self.cache = BlockOutputs(model, prefix_limit_bytes)
        self.passes: list[dict[str, Any]] = []
        self.fp: dict[str, Any] | None = None
        self.shared: list[list[str]] = []
        self._logprobs: torch.Tensor | None = None

    def reference(self) -> dict[str, Any]:
        """The full-precision pass: perplexity, reference log-probabilities, shared inputs, block
        outputs."""
        order: list[str] = []
        same: list[bool] = []
        last: list[torch.Tensor | None] = [None]
        done = [False]

        def observer(name: str, x: torch.Tensor) -> None:
            if not done[0]:
                order.append(name)
                same.append(last[0] is x)
                last[0] = x

        keep = _Reference(len(self.windows))

        def on_logits(first: int, logits: torch.Tensor, tokens: torch.Tensor) -> None:
            done[0], last[0] = True, None
            keep(first, logits, tokens)

        started = time.perf_counter()
        capture = LinearInputCapture({layer.name: layer.module for layer in self.selected}, observer)
        with self.cache.recording(), capture:
            row = run_scheme(self.model, self.windows, Scheme("fp", Mode.FP), self.selected,
                             batch_size=self.batch_size,
                             progress=stage_callback(self.progress, "fp (reference)"), on_logits=on_logits)
        self._logprobs = keep.logprobs
        self.shared = shared_input_sets(order, same)
        row["kl"], row["window_kl"], row["stage"] = 0.0, [0.0] * len(self.windows), "fp (reference)"
        self.fp = row
        self._count("fp (reference)", "fp", 0, time.perf_counter() - started)
        return row

    def measure(self, stage: str, scheme: Scheme, layers: Sequence[LinearLayer], *,
                skip: bool = True) -> dict[str, Any]:
        """``scheme`` on ``layers`` only; from their first block when ``skip`` and the replay is ready.
        A row like :func:`~kernelscope.runs.evaluate.run_scheme`'s, with ``kl``, ``window_kl``,
        ``first_block``, ``cost`` and, against the reference, its paired difference."""
        if self.fp is None or self._logprobs is None:
            raise RuntimeError("measure needs the reference pass first")
        first = Group("", "", tuple(layers)).first_block if skip and layers else 0
        divergence = _Divergence(self._logprobs)
        started = time.perf_counter()
        with self.cache.starting_at(first) as start:
            row = run_scheme(self.model, self.windows, scheme, list(layers), transform=self.transform,
                             batch_size=self.batch_size, progress=stage_callback(self.progress, stage),
                             on_logits=divergence, calibration=self.calibration)
        positions = self.windows.seqlen - 1
        row["window_kl"] = divergence.per_window(positions)
        row["kl"] = float(divergence.sums.sum()) / (len(self.windows) * positions)
        row |= compare(row, self.fp)
        row["stage"], row["first_block"] = stage, start
        row["cost"] = self._count(stage, scheme.name, start, time.perf_counter() - started)
        return row

    def _count(self, stage: str, scheme: str, first: int, seconds: float) -> float:
        cost = pass_cost(self.costs, first)
        self.passes.append({"stage": stage, "scheme": scheme, "first_block": first, "cost": cost,
                            "seconds": round(seconds, 3)})
        return cost

    @property
    def forward_passes(self) -> float:
        """Work so far in full-pass equivalents."""
        return sum(p["cost"] for p in self.passes)

    def release(self) -> None:
        """Free the reference log-probabilities and block outputs."""
        self._logprobs = None
        self.cache = BlockOutputs(self.model, 0)


# -- sensitivity rows ---------------------------------------------------------------------------------

_KEEP = ("perplexity", "perplexity_ci_low", "perplexity_ci_high", "nll", "window_nll", "delta_nll",
         "delta_nll_ci_low", "delta_nll_ci_high", "change_pct", "change_pct_ci_low", "change_pct_ci_high",
         "vs_fp", "kl", "kernel_fraction", "cost", "seconds")


def group_row(group: Group, quantized: dict, removed: dict | None, fp: dict, total_parameters: int) -> dict:
    """One sensitivity row: the group, its loss under the scheme, and (when measured) under the
    removal of its kernel, with the share of the loss the kernel explains."""
    row = {"group_kind": group.kind, "group": group.name, "layers": [layer.name for layer in group.layers],
           "layer_count": len(group.layers), "parameters": group.parameters,
           "parameter_share": group.parameters / total_parameters if total_parameters else None,
           "first_block": quantized["first_block"], **{k: quantized[k] for k in _KEEP}}
    row |= {f"kernel_{k}": (removed[k] if removed else None) for k in _KEEP}
    share = (ratio_interval(removed["window_nll"], quantized["window_nll"], fp["window_nll"]) if removed
             else None)
    row["kernel_share"] = share[0] if share else None
    row["kernel_share_ci_low"] = share[1][0] if share and share[1] else None
    row["kernel_share_ci_high"] = share[1][1] if share and share[1] else None
    return row


def rank_rows(rows: list[dict]) -> list[dict]:
    """Rank within each kind, 1 = most sensitive: by the measured loss, then by the KL."""
    for kind in GROUP_KINDS:
        members = [r for r in rows if r["group_kind"] == kind]
        ordered = sorted(members, key=lambda r: (-_finite(r["delta_nll"]), -_finite(r["kl"])))
        for i, r in enumerate(ordered, start=1):
            r["rank"] = i
    return rows


def _finite(x: float | None) -> float:
    return -math.inf if x is None or math.isnan(x) else x


def measure_groups(probe: Probe, scheme: Scheme, groups: Sequence[Group],
                   kernel_kinds: Sequence[str]) -> list[dict]:
    """For each group: one pass with only it under ``scheme`` and, for the kinds in
    ``kernel_kinds``, one with only its kernel removed."""
    removal = kernel_scheme(scheme)
    total = sum(layer.module.weight.numel() for layer in probe.selected)
    rows = []
    for g in groups:
        quantized = probe.measure(f"{g.name}: {scheme.name}", scheme, g.layers)
        removed = (probe.measure(f"{g.name}: kernel", removal, g.layers) if g.kind in kernel_kinds else None)
        rows.append(group_row(g, quantized, removed, probe.fp, total))
    return rank_rows(rows)


def kernel_explains(scheme_row: dict, kernel_row: dict, fp: dict) -> dict:
    """How much of the scheme's loss removing its kernel alone causes, in log perplexity, with its
    paired interval; undefined when the scheme's own loss is not separable from fp."""
    found = ratio_interval(kernel_row["window_nll"], scheme_row["window_nll"], fp["window_nll"])
    if found is None:
        return {"share": None, "ci_low": None, "ci_high": None, "note": _no_share(scheme_row)}
    share, ci = found
    return {"share": share, "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
            "note": "remove-kernel loss / full quantization loss, both in log perplexity over fp"}


def _no_share(scheme_row: dict) -> str:
    """Why the kernel's share of a scheme's loss is undefined: the scheme has no loss to share, because
    it is better than fp or not separable from it on these windows."""
    if (scheme_row.get("vs_fp") or "").startswith("better"):
        return "undefined: the scheme is better than fp on these windows, so it has no loss to explain"
    return "undefined: the scheme's loss is not separable from fp on these windows"


def summarize(row: dict) -> dict:
    """What a summary keeps of a measured pass (the per-window lists stay in the tables)."""
    return {k: row.get(k) for k in ("scheme", "perplexity", "perplexity_ci_low", "perplexity_ci_high", "nll",
                                     "delta_nll", "delta_nll_ci_low", "delta_nll_ci_high", "change_pct",
                                     "change_pct_ci_low", "change_pct_ci_high", "vs_fp", "kl",
                                     "kernel_fraction", "cost", "seconds")}


class SensitivityResult(TableResult):
    """One row per group (``table``) and the JSON summary."""

    TABLE = "sensitivity"


def check_kinds(groups: Sequence[str], kernel_groups: Sequence[str]) -> None:
    for kind in (*groups, *kernel_groups):
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r}; choose from {', '.join(GROUP_KINDS)}")
    if not groups:
        raise ValueError("give at least one kind of group")


def prepare_probe(net: nn.Module, windows: Windows, scheme: Scheme, selected: list[LinearLayer], *,
                  transform: TransformSpec = IDENTITY, calibration: Windows | None, batch_size: int,
                  progress: StageProgress | None) -> Probe:
    """A probe measuring in the basis of the scheme's own transform then ``transform``, bound to the
    selected layers (calibrated on ``calibration`` where a step needs it)."""
    spec = scheme_transform(scheme, transform)
    bound = (None if spec.is_identity
             else TransformBinder(net, selected, calibration, batch_size=batch_size).bind(spec))
    basis = bound or identity_transform(selected)
    scales, facts = calibrate_target(net, scheme, selected, basis, calibration, batch_size=batch_size)
    probe = Probe(net, windows, selected, transform=bound, batch_size=batch_size, progress=progress,
                  calibration=scales)
    probe.static_scales = facts or None
    return probe


def sensitivity(
    model: nn.Module | LoadedModel,
    windows: Windows,
    scheme: Scheme,
    *,
    text: TextSource | None = None,
    layers: str | Sequence[LinearLayer] | None = None,
    groups: Sequence[str] = ("module_type", "block"),
    kernel_groups: Sequence[str] = ("module_type", "block"),
    transform: TransformSpec = IDENTITY,
    calibration: Windows | None = None,
    batch_size: int = 1,
    progress: StageProgress | None = None,
) -> SensitivityResult:
    """The sensitivity of each group of ``groups`` kinds to ``scheme`` (see the module docstring),
    ranked within each kind; the kinds in ``kernel_groups`` also get their kernel's share. Costs one
    reference pass, one pass of the whole scheme, one of its whole kernel, and one (or two) per group,
    each from the group's first block."""
    check_kinds(groups, kernel_groups)
    net, info, _ = unpack(model)
    selected = resolve_layers(net, layers)
    started = time.perf_counter()
    probe = prepare_probe(net, windows, scheme, selected, transform=transform, calibration=calibration,
                          batch_size=batch_size, progress=progress)
    try:
        fp = probe.reference()
        whole = probe.measure(scheme.name, scheme, selected)
        kernel = probe.measure("remove-kernel", kernel_scheme(scheme), selected)
        rows = measure_groups(probe, scheme, make_groups(selected, probe.shared, groups), kernel_groups)
    finally:
        probe.release()
    summary = {
        **run_context(info, text, windows, "sensitivity"),
        "protocol": protocol_text(windows),
        "uncertainty": METHOD,
        "scheme": scheme.describe(),
        "fp": summarize(fp), "quantized": summarize(whole), "kernel": summarize(kernel),
        "kernel_explains": kernel_explains(whole, kernel, fp),
        "groups": [{k: r[k] for k in ("group_kind", "group", "rank", "layer_count", "delta_nll", "change_pct",
                                      "vs_fp", "kl", "kernel_delta_nll", "kernel_share")} for r in rows],
        "shared_inputs": [names for names in probe.shared if len(names) > 1],
        "forward_passes": probe.forward_passes, "runs": len(probe.passes), "passes": probe.passes,
        "seconds": round(time.perf_counter() - started, 3),
        "settings": {"batch_size": batch_size, "groups": list(groups), "kernel_groups": list(kernel_groups)},
    }
    return SensitivityResult(pl.DataFrame(rows, infer_schema_length=None), summary)


__all__ = ["GROUP_KINDS", "Group", "Probe", "SensitivityResult", "kernel_scheme", "make_groups",
           "measure_groups", "sensitivity"]
