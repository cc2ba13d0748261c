"""``advise``: the fewest Linear layers to keep in full precision so that a scheme stays within tolerance.

1. Sensitivity (:mod:`kernelscope.runs.sensitivity`): the loss of each module-type group and each
   block quantized alone (or each layer, on request), on the evaluation windows.
2. Units of the plan are *cells*: the layers of one block fed the same tensor (q/k/v, gate/up, o,
   down), the unit a deploying runtime fuses. A cell's loss is estimated from the groups it belongs
   to: the sum of its layers' measured losses when layers were measured, else its block's loss
   shared among the block's cells in proportion to their module-type groups' losses
   (``block · type / Σ types``, losses below 0 counted as 0). Cells are ranked by that estimate.
3. Search, measuring every candidate: keeping the top k cells is a plan; the scheme alone is k = 0,
   keeping every cell is full precision. Between the largest k measured beyond tolerance and the
   smallest measured within, the next k is where the line through the two measured losses (against
   the cumulated estimates) crosses the tolerance, or the midpoint when one side has not moved twice
   in a row; it ends when the two are neighbours. The plan is the smallest k measured within: its
   perplexity and interval are those of its own pass on the same windows, never a prediction. A
   curve that is not monotone can make a larger prefix fail after a smaller one passed; the plan is
   still a measured one.
4. With a budget (a share of the covered layers' parameters allowed in full precision) the plan is
   instead the cells of largest estimated loss per parameter that fit in it, measured once.

It also states how much of the scheme's loss its kernel explains: the remove-kernel loss over the
full quantization loss, in log perplexity, overall and per group where the kernel was measured.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from torch import nn

from kernelscope.capture import is_linear
from kernelscope.data import TextSource, Windows
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant.modes import Mode
from kernelscope.quant.transforms import IDENTITY, TransformSpec
from kernelscope.results import exports, write_run
from kernelscope.runs.common import (
    StageProgress,
    TableResult,
    resolve_layers,
    run_context,
    stage_callback,
    text_facts,
    unpack,
)
from kernelscope.runs.evaluate import compare, protocol_text, run_scheme, scheme_layers, scheme_transform
from kernelscope.runs.schemes import Scheme
from kernelscope.runs.sensitivity import (
    Probe,
    check_kinds,
    kernel_explains,
    kernel_scheme,
    make_groups,
    measure_groups,
    prepare_probe,
    summarize,
)
from kernelscope.stats.uncertainty import METHOD


@dataclass(frozen=True)
class Cell:
    """The layers of one block fed the same tensor: the unit a plan keeps or quantizes."""

    name: str
    block: int | None
    kind: tuple[str, ...]  # the module types, e.g. ("q_proj", "k_proj", "v_proj")
    layers: tuple[LinearLayer, ...]
    order: int

    @property
    def parameters(self) -> int:
        return sum(layer.module.weight.numel() for layer in self.layers)


def make_cells(selected: list[LinearLayer], shared: list[list[str]]) -> list[Cell]:
    """One cell per set of layers of one block that receive the same input, in module order."""
    order = {layer.name: i for i, layer in enumerate(selected)}
    by_name = {layer.name: layer for layer in selected}
    seen = {n for names in shared for n in names}
    sets = [[n for n in names if n in by_name] for names in shared]
    sets = [s for s in sets if s] + [[layer.name] for layer in selected if layer.name not in seen]
    cells = []
    for names in sorted(sets, key=lambda s: order[s[0]]):
        layers = tuple(by_name[n] for n in names)
        blocks = {layer.block for layer in layers}
        if len(blocks) > 1:  # a tensor fed across blocks: split it by block
            for b in sorted(blocks, key=lambda x: -1 if x is None else x):
                part = tuple(lay for lay in layers if lay.block == b)
                cells.append(_cell(part, order))
        else:
            cells.append(_cell(layers, order))
    return cells


def _cell(layers: tuple[LinearLayer, ...], order: dict[str, int]) -> Cell:
    first = layers[0]
    kind = tuple(layer.module_type for layer in layers)
    if len(layers) == 1:
        name = first.name
    else:
        stem = first.name.rsplit(".", 1)[0] if "." in first.name else ""
        name = f"{stem}.{{{','.join(layer.name.rsplit('.', 1)[-1] for layer in layers)}}}"
    return Cell(name, first.block, kind, layers, order[first.name])


def estimate_losses(cells: list[Cell], rows: list[dict], field: str) -> list[float]:
    """Each cell's estimated loss from the groups' measured ``field`` (``delta_nll`` or ``kl``)."""
    def pos(v: float | None) -> float:  # a loss below 0 (noise, or a gain) explains nothing
        return max(v, 0.0) if v is not None and math.isfinite(v) else 0.0

    layer = {r["group"]: pos(r[field]) for r in rows if r["group_kind"] == "layer"}
    types = [(set(r["layers"]), pos(r[field]), r["parameters"]) for r in rows
             if r["group_kind"] == "module_type"]
    blocks = {r["group"]: (pos(r[field]), r["parameters"]) for r in rows if r["group_kind"] == "block"}
    total_types = sum(v for _, v, _ in types)
    out = []
    for cell in cells:
        names = {lay.name for lay in cell.layers}
        if layer and names <= set(layer):
            out.append(sum(layer[n] for n in names))
            continue
        t = next(((v, p) for members, v, p in types if names <= members), None)
        b = blocks.get(f"block {cell.block}") if cell.block is not None else None
        if t is not None and b is not None:
            out.append(b[0] * t[0] / total_types if total_types > 0 else 0.0)
        elif b is not None:
            out.append(b[0] * cell.parameters / b[1])
        elif t is not None:
            out.append(t[0] * cell.parameters / t[1])
        else:
            out.append(0.0)
    return out


def rank_cells(cells: list[Cell], rows: list[dict]) -> tuple[list[Cell], list[dict]]:
    """Cells by estimated loss (then estimated KL, then module order), and their table rows."""
    loss, kl = estimate_losses(cells, rows, "delta_nll"), estimate_losses(cells, rows, "kl")
    ranked = sorted(range(len(cells)), key=lambda i: (-loss[i], -kl[i], cells[i].order))
    table = [{"rank": r, "cell": cells[i].name, "block": cells[i].block, "module_types": list(cells[i].kind),
              "layers": [lay.name for lay in cells[i].layers], "parameters": cells[i].parameters,
              "estimated_delta_nll": loss[i], "estimated_kl": kl[i]} for r, i in enumerate(ranked, start=1)]
    return [cells[i] for i in ranked], table


# -- search ---------------------------------------------------------------------------------------

class PlanSearch:
    """Measures prefixes of the ranked cells; keeps every measured candidate."""

    def __init__(self, probe: Probe, scheme: Scheme, cells: list[Cell], whole: dict,
                 tolerance: float) -> None:
        self.probe, self.scheme, self.cells, self.tolerance = probe, scheme, cells, tolerance
        self.target = probe.fp["perplexity"] * (1 + tolerance)
        self.rows: dict[int, dict] = {0: whole, len(cells): probe.fp}
        self.log: list[dict] = []

    def within(self, row: dict) -> bool:
        return math.isfinite(row["perplexity"]) and row["perplexity"] <= self.target

    def kept(self, cells: Sequence[Cell]) -> set[str]:
        return {lay.name for c in cells for lay in c.layers}

    def measure(self, cells: Sequence[Cell], label: str) -> dict:
        keep = self.kept(cells)
        quantized = [lay for lay in self.probe.selected if lay.name not in keep]
        row = self.probe.measure(label, self.scheme, quantized, skip=False)
        self.note(label, cells, row)
        return row

    def note(self, label: str, cells: Sequence[Cell], row: dict) -> None:
        self.log.append({"stage": label, "kept_cells": len(cells), "kept_layers": len(self.kept(cells)),
                         "parameters": sum(c.parameters for c in cells), "perplexity": row["perplexity"],
                         "perplexity_ci_low": row["perplexity_ci_low"],
                         "perplexity_ci_high": row["perplexity_ci_high"],
                         "change_pct": row.get("change_pct"), "within_tolerance": self.within(row),
                         "window_nll": row["window_nll"]})

    def prefix(self, k: int) -> dict:
        if k not in self.rows:
            self.rows[k] = self.measure(self.cells[:k], f"plan: keep {k} of {len(self.cells)} cells")
        return self.rows[k]

    def fewest(self, estimates: list[float]) -> int:
        """The smallest prefix measured within tolerance, its lower neighbour measured beyond it."""
        n = len(self.cells)
        self.note(self.scheme.name, [], self.rows[0])
        if self.within(self.rows[0]) or n == 0:
            return 0
        cum = [0.0]
        for e in estimates:
            cum.append(cum[-1] + e)
        goal = math.log1p(self.tolerance)
        lo, hi, moved = 0, n, []
        while hi - lo > 1:
            k = self._next(lo, hi, cum, goal, moved)
            if self.within(self.prefix(k)):
                hi, side = k, "hi"
            else:
                lo, side = k, "lo"
            moved.append(side)
        return hi

    def _next(self, lo: int, hi: int, cum: list[float], goal: float, moved: list[str]) -> int:
        """Regula falsi on (cumulated estimate, measured loss), bisection after one side held twice."""
        mid = (lo + hi) // 2
        if len(moved) >= 2 and moved[-1] == moved[-2]:
            return mid
        fp = self.probe.fp["nll"]
        loss_lo, loss_hi = self.rows[lo]["nll"] - fp, self.rows[hi]["nll"] - fp
        span = cum[hi] - cum[lo]
        if not (math.isfinite(loss_lo) and loss_lo > loss_hi and span > 0):
            return mid
        x = cum[lo] + (loss_lo - goal) / (loss_lo - loss_hi) * span
        k = next((j for j in range(lo + 1, hi) if cum[j] >= x), hi - 1)
        return min(max(k, lo + 1), hi - 1)

    def within_budget(self, budget: float, estimates: list[float]) -> list[Cell]:
        """Cells of largest estimated loss per parameter that fit in ``budget`` of the parameters."""
        allowed = budget * sum(lay.module.weight.numel() for lay in self.probe.selected)
        ratio = sorted(range(len(self.cells)),
                       key=lambda i: (-estimates[i] / max(self.cells[i].parameters, 1), self.cells[i].order))
        chosen, used = [], 0
        for i in ratio:
            if estimates[i] > 0 and used + self.cells[i].parameters <= allowed:
                chosen.append(self.cells[i])
                used += self.cells[i].parameters
        return sorted(chosen, key=lambda c: self.cells.index(c))


# -- the result -----------------------------------------------------------------------------------

class AdviceResult(TableResult):
    """The sensitivity table (``table``), the cells and the measured candidates, the summary (the
    plan) and the exports for llm-compressor and ModelOpt."""

    TABLE = "sensitivity"

    def __init__(self, table: pl.DataFrame, summary: dict[str, Any], tables: dict[str, pl.DataFrame],
                 files: dict[str, str]) -> None:
        super().__init__(table, summary)
        self.tables = {self.TABLE: table, **tables}
        self.files = files

    def save(self, path: str | Path, *, overwrite: bool = False, **writing: Any) -> Path:
        return write_run(path, self.tables, self.summary, overwrite=overwrite, files=self.files, **writing)


def _linear_modules(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if is_linear(m)}


def _plan(search: PlanSearch, kept: list[Cell], row: dict, model: nn.Module, tolerance: float) -> dict:
    names = [lay.name for lay in search.probe.selected if lay.name in search.kept(kept)]
    quantized = {lay.name for lay in search.probe.selected} - set(names)
    total = sum(lay.module.weight.numel() for lay in search.probe.selected)
    params = sum(c.parameters for c in kept)
    return {
        "kept_modules": names,
        "full_precision_modules": [n for n in _linear_modules(model) if n not in quantized],
        "kept_cells": [c.name for c in kept],
        "kept_layers": len(names), "quantized_layers": len(quantized),
        "parameters": params, "parameter_share": params / total if total else None,
        **summarize(row),
        "within_tolerance": search.within(row),
        "target_perplexity": search.target,
        "measured": f"by its own pass over the same windows (stage {row['stage']!r})",
        "tolerance": tolerance,
    }


def verify(probe: Probe, scheme: Scheme, plan: dict, holdout: Windows, tolerance: float) -> dict:
    """The plan measured again on ``holdout``, windows it was not chosen on: fp, the scheme alone and the
    plan, each its own pass, the plan's paired change from fp and whether it still holds the tolerance
    (by its point estimate, and by the upper end of its interval)."""
    kept = set(plan["kept_modules"])
    layers = [lay for lay in probe.selected if lay.name not in kept]

    def measured(stage: str, s: Scheme, on: list[LinearLayer]) -> dict:
        return run_scheme(probe.model, holdout, s, on, transform=probe.transform,
                          calibration=probe.calibration, batch_size=probe.batch_size,
                          progress=stage_callback(probe.progress, stage))

    fp = measured("held-out: fp", Scheme("fp", Mode.FP), probe.selected)
    whole = measured(f"held-out: {scheme.name}", scheme, probe.selected)
    row = measured("held-out: the plan", scheme, layers) if kept else whole
    whole, row = whole | compare(whole, fp), row | compare(row, fp)
    high = row.get("change_pct_ci_high")
    return {
        "windows": holdout.as_dict(),
        "fp": summarize(fp), "quantized": summarize(whole), "plan": summarize(row),
        "within_tolerance": math.isfinite(row["perplexity"])
        and row["perplexity"] <= fp["perplexity"] * (1 + tolerance),
        "within_tolerance_by_interval": high is not None and high <= 100 * tolerance,
        "note": "the plan was chosen on the selection windows; these windows played no part in choosing it",
    }


def _exports(scheme: Scheme, transform: TransformSpec, plan: dict, fp: dict, windows: Windows,
             text: TextSource | None, linear: Sequence[str]) -> tuple[dict, dict]:
    """The files for the deploying libraries (each only where its library quantizes as the scheme was
    measured) and the summary's account of them: which were written, which not and why, the notes."""
    d = exports.deployment(scheme, scheme_transform(scheme, transform))
    ignore = plan["full_precision_modules"]
    quantized = [n for n in linear if n not in set(ignore)]
    ct, mo = d.llmcompressor, exports.modelopt_for(d.modelopt, quantized)
    files = {exports.MODULES: exports.modules_text(plan["kept_modules"])}
    source = text.description if text is not None else "the evaluation text"
    header = [(f"kernelscope advise: {scheme.name} with {plan['kept_layers']} Linear layers kept in full "
               "precision"),
              (f"measured perplexity {plan['perplexity']:.4f} (fp {fp['perplexity']:.4f}, "
               f"{plan['change_pct']:+.2f}%) on {len(windows)} windows of {windows.seqlen} tokens of "
               f"{source}")]
    if ct.ok:
        files[exports.RECIPE] = exports.recipe_yaml(ct, ignore, header)
    if mo.ok:
        files[exports.MODELOPT] = exports.modelopt_yaml(mo, quantized, ignore, header)
    info = {"recipe": exports.RECIPE if ct.ok else None, "recipe_scheme": ct.preset,
            "recipe_note": ct.reason,
            "modelopt": exports.MODELOPT if mo.ok else None, "modelopt_base_config": mo.preset,
            "modelopt_note": mo.reason, "modelopt_algorithm": mo.algorithm if mo.ok else None,
            "modules": exports.MODULES,
            "notes": [f"{e.library}: {n}" for e in (ct, mo) if e.ok for n in e.notes]}
    return files, info


@dataclass
class _Outcome:
    """Everything one advice measured, handed from the passes to the summary."""

    fp: dict
    whole: dict
    kernel: dict
    groups: list
    rows: list[dict]
    cell_rows: list[dict]
    search: PlanSearch
    kept: list[Cell]
    row: dict
    replay: str


def _measure(probe: Probe, scheme: Scheme, tolerance: float, budget: float | None, groups: Sequence[str],
             kernel_groups: Sequence[str]) -> _Outcome:
    """The passes: reference, whole scheme, whole kernel, groups, then the plan's candidates."""
    selected = probe.selected
    fp = probe.reference()
    whole = probe.measure(scheme.name, scheme, selected)
    kernel = probe.measure("remove-kernel", kernel_scheme(scheme), selected)
    group_list = make_groups(selected, probe.shared, groups)
    rows = measure_groups(probe, scheme, group_list, kernel_groups)
    cells, cell_rows = rank_cells(make_cells(selected, probe.shared), rows)
    estimates = [r["estimated_delta_nll"] for r in cell_rows]
    search = PlanSearch(probe, scheme, cells, whole, tolerance)
    if budget is None:
        kept = cells[: search.fewest(estimates)]
        row = search.rows[len(kept)]
    else:
        search.note(scheme.name, [], whole)
        kept = search.within_budget(budget, estimates)
        row = search.measure(kept, f"plan within budget: keep {len(kept)} cells") if kept else whole
    search.note("fp", cells, fp | {"change_pct": 0.0})  # every cell kept: the reference pass, the curve's end
    replay = probe.cache.reason or "passes start at the first block they change"
    return _Outcome(fp, whole, kernel, group_list, rows, cell_rows, search, kept, row, replay)


def _summary(o: _Outcome, probe: Probe, scheme: Scheme, transform: TransformSpec, plan: dict,
             export_info: dict, info: dict, text: TextSource | None, windows: Windows, tolerance: float,
             budget: float | None, groups: Sequence[str], kernel_groups: Sequence[str],
             calibration: Windows | None, calibration_text: TextSource | None, batch_size: int,
             started: float) -> dict[str, Any]:
    """What ``summary.json`` holds of one advice."""
    drop = ("window_nll", "kernel_window_nll")
    kinds = {k: sum(1 for g in o.groups if g.kind == k) for k in dict.fromkeys(g.kind for g in o.groups)}
    summary = {
        **run_context(info, text, windows, "advise"),
        "protocol": protocol_text(windows),
        "uncertainty": METHOD,
        "scheme": scheme.describe(),
        "transform": scheme_transform(scheme, transform).label,
        "tolerance": tolerance,
        "budget": budget,
        "fp": summarize(o.fp),
        "quantized": summarize(o.whole),
        "kernel": summarize(o.kernel),
        "kernel_explains": kernel_explains(o.whole, o.kernel, o.fp),
        "plan": plan,
        "sensitivity": [{k: v for k, v in r.items() if k not in drop} for r in o.rows],
        "groups": {"count": len(o.groups), **kinds, "kernel_measured": list(kernel_groups)},
        "forward_passes": round(probe.forward_passes, 3),
        "forward_passes_note": "full-pass equivalents: a pass from block b counts the share of the model's "
                               "Linear multiply-adds in blocks >= b and outside the blocks",
        "runs": len(probe.passes),
        "pass_budget": len(o.groups) + 3,
        "passes": probe.passes,
        "prefix_replay": o.replay,
        "seconds": round(time.perf_counter() - started, 3),
        "calibration": ({"text": text_facts(calibration_text), "windows": calibration.as_dict()}
                        if calibration is not None and scheme.calibrates(transform) else None),
        "static_scales": probe.static_scales,
        "settings": {"batch_size": batch_size, "groups": list(groups), "kernel_groups": list(kernel_groups)},
        "exports": export_info,
    }
    return summary


def _check_advice(scheme: Scheme, tolerance: float, budget: float | None, groups: Sequence[str],
                  kernel_groups: Sequence[str]) -> None:
    if not scheme.changes_activation:
        raise ValueError(
            f"scheme {scheme.name} quantizes no activation: it has no kernel for advise to weigh")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a positive number, got {tolerance}")
    if budget is not None and not 0 < budget <= 1:
        raise ValueError(f"budget must lie in (0, 1], got {budget}")
    check_kinds(groups, kernel_groups)


def advise(
    model: nn.Module | LoadedModel,
    windows: Windows,
    scheme: Scheme,
    *,
    text: TextSource | None = None,
    tolerance: float = 0.01,
    budget: float | None = None,
    layers: str | Sequence[LinearLayer] | None = None,
    groups: Sequence[str] = ("module_type", "block"),
    kernel_groups: Sequence[str] = ("module_type",),
    transform: TransformSpec = IDENTITY,
    calibration: Windows | None = None,
    calibration_text: TextSource | None = None,
    holdout: Windows | None = None,
    batch_size: int = 1,
    progress: StageProgress | None = None,
) -> AdviceResult:
    """The plan (see the module docstring) for ``scheme`` on ``windows``, every figure measured on them.

    ``groups``: kinds of sensitivity group (``module_type``, ``block``, ``layer``); ``kernel_groups``:
    the kinds whose kernel's share is measured too (one more pass per group); ``transform``: the basis
    the scheme quantizes in (after its own transform; calibrated steps need ``calibration``). Costs a
    reference pass,
    one pass of the whole scheme, one of its whole kernel, one per group (from the group's first
    block) and one per kernel-measured group, then the search's candidates. With ``holdout`` (windows
    disjoint from ``windows``), the chosen plan is measured again on them (:func:`verify`): three more
    passes over those windows, whose figure the exports quote.
    """
    _check_advice(scheme, tolerance, budget, groups, kernel_groups)
    net, info, _ = unpack(model)
    started = time.perf_counter()
    selected = scheme_layers(net, [scheme], resolve_layers(net, layers), [], [transform])[scheme.name]
    probe = prepare_probe(net, windows, scheme, selected, transform=transform,
                          calibration=calibration, batch_size=batch_size, progress=progress)
    try:
        o = _measure(probe, scheme, tolerance, budget, groups, kernel_groups)
    finally:
        probe.release()
    plan = _plan(o.search, o.kept, o.row, net, tolerance)
    if holdout is not None:
        plan["holdout"] = verify(probe, scheme, plan, holdout, tolerance)
    files, export_info = _exports(scheme, transform, plan, o.fp, windows, text, list(_linear_modules(net)))
    summary = _summary(o, probe, scheme, transform, plan, export_info, info, text, windows, tolerance,
                       budget, groups, kernel_groups, calibration, calibration_text, batch_size, started)
    tables = {"cells": pl.DataFrame(o.cell_rows, infer_schema_length=None),
              "search": pl.DataFrame(o.search.log, infer_schema_length=None)}
    return AdviceResult(pl.DataFrame(o.rows, infer_schema_length=None), summary, tables, files)


__all__ = ["AdviceResult", "Cell", "PlanSearch", "advise", "make_cells", "rank_cells"]
