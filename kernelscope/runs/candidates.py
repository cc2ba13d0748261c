"""Deploy candidates: several schemes under several transforms, each planned by :func:`advise` on the
selection windows and checked on held-out ones, ranked so that the first is the one to deploy.

A candidate is a scheme, a basis and the smallest keep-set :func:`advise` finds within tolerance. It
counts for deployment only where a library can compute it:

- ``exact``: no transform, and llm-compressor or ModelOpt quantizes exactly as it was measured (the
  exports say which; a ``LIBRARY:NAME`` target always);
- ``approximate``: a transform a library applies in its own way (its registry entry says which), so the
  deployed model must be measured again after applying it;
- ``none``: a diagnostic (CrossQuant, remove-kernel, a format no library has), shown, never recommended.

Ranking, first to last: deployable before diagnostic; held out within tolerance before not (a candidate
without held-out windows counts its selection figure); fewer bits per weight parameter (kept layers at
16 bits, block scales counted); deployed exactly as measured before approximately; then the smaller
held-out change from fp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from kernelscope.quant.formats import FULL_PRECISION_BITS, Form, Unit, stored_bits
from kernelscope.quant.transforms import IDENTITY, TransformSpec
from kernelscope.results import exports
from kernelscope.results.decision_rules import APPROXIMATE as APPROXIMATE  # the statuses, named here too
from kernelscope.results.decision_rules import BELOW_THE_FORMAT, EXACT, NONE, rank_key
from kernelscope.results.decision_rules import deployability as status_of
from kernelscope.runs.advise import AdviceResult, advise
from kernelscope.runs.evaluate import scheme_transform
from kernelscope.runs.schemes import Scheme


def weight_bits(scheme: Scheme) -> float:
    """Bits a quantized weight parameter costs under ``scheme``, its block scales shared among the
    block's elements (per-channel scales, one per thousands of elements, are not counted)."""
    if scheme.target is not None:
        return scheme.target.weight_bits
    config = scheme.weight_quantizer
    if config is None or not scheme.changes_weight:
        return FULL_PRECISION_BITS
    fmt = config.format
    if fmt.rule.unit is not Unit.BLOCK:
        return float(fmt.grid.bits)
    scale = 8 if fmt.rule.form in (Form.E8M0_FLOOR, Form.E8M0_RCEIL, Form.NVFP4) else FULL_PRECISION_BITS
    return stored_bits(fmt.grid.bits, fmt.block_size, scale)


def deployability(scheme: Scheme, basis: TransformSpec) -> tuple[str, str]:
    """``(status, how)``: whether a library can deploy the candidate, and which (or why none); the
    status in the words of :mod:`~kernelscope.results.decision_rules`."""
    d = exports.deployment(scheme, IDENTITY)  # the scheme itself, in the model's own basis
    able = [e for e in (d.llmcompressor, d.modelopt) if e.ok]
    exact = [e for e in able if not e.notes]
    ways = [step.entry.deployed_by for step in basis.steps]
    status = status_of(bool(able) and all(ways), bool(exact) and basis.is_identity)
    if not able:
        return status, d.llmcompressor.reason or d.modelopt.reason or "no library expresses it"
    if status == NONE:
        return status, f"no library applies the {basis.label} transform"
    libraries = " or ".join(e.library for e in (exact or able))
    if status == EXACT:
        return status, libraries
    if not basis.is_identity:
        return status, f"{libraries}, after the transform: " + "; ".join(ways)
    return status, f"{libraries}, {BELOW_THE_FORMAT}: " + "; ".join(able[0].notes)


def _held_out(plan: dict) -> dict:
    """The plan's figure to rank by: held out where it was measured, else its selection figure."""
    h = plan.get("holdout")
    return h["plan"] | {"within_tolerance": h["within_tolerance"]} if h else plan


def candidate_row(result: AdviceResult, scheme: Scheme, basis: TransformSpec) -> dict[str, Any]:
    """One candidate, as the candidates table holds it."""
    s = result.summary
    plan, bits = s["plan"], weight_bits(scheme)
    status, how = deployability(scheme, basis)
    share = plan["parameter_share"] or 0.0
    checked = _held_out(plan)
    return {
        "scheme": scheme.name, "transform": basis.label, "deployable": status, "deploy_with": how,
        "kept_layers": plan["kept_layers"], "parameter_share_kept": share,
        "bits_per_weight": share * FULL_PRECISION_BITS + (1 - share) * bits,
        "selection_change_pct": plan["change_pct"],
        "selection_within_tolerance": plan["within_tolerance"],
        "held_out": plan.get("holdout") is not None,
        "change_pct": checked["change_pct"], "change_pct_ci_low": checked["change_pct_ci_low"],
        "change_pct_ci_high": checked["change_pct_ci_high"], "perplexity": checked["perplexity"],
        "within_tolerance": bool(checked["within_tolerance"]),
    }


def rank(rows: list[dict]) -> list[dict]:
    """``rows`` in the order of the module docstring (the rules of
    :data:`~kernelscope.results.decision_rules.RANKING`), each with its ``rank`` (1 = deploy this)."""
    ordered = sorted(rows, key=rank_key)
    return [r | {"rank": i} for i, r in enumerate(ordered, start=1)]


def advise_candidates(model, windows, schemes: Sequence[Scheme], transforms: Sequence[TransformSpec],
                      **settings: Any) -> AdviceResult:
    """:func:`advise` for every scheme under every transform (``settings`` as it takes them), ranked;
    the first candidate's advice, its summary and tables holding every candidate."""
    results, rows = [], []
    for scheme in schemes:
        for transform in transforms:
            result = advise(model, windows, scheme, transform=transform, **settings)
            results.append(result)
            rows.append(candidate_row(result, scheme, scheme_transform(scheme, transform)))
    for i, row in enumerate(rows):
        row["index"] = i
    ranked = rank(rows)
    best = results[ranked[0]["index"]]
    table = [{k: v for k, v in r.items() if k != "index"} for r in ranked]
    best.summary["candidates"] = table
    best.summary["candidates_ranking"] = " ".join(__doc__.split("Ranking, first to last: ", 1)[1].split())
    best.tables["candidates"] = pl.DataFrame(table, infer_schema_length=None)
    return best
