"""``threshold_search``: from what kernel proportion on does removing the kernel cost perplexity?

The kernels searched over are one family with one parameter: ``K_λ = {|x| ≤ λ·B}``, the per-token
zero bound ``B = 0.5·t_i/qmax`` scaled by λ (``--family`` picks another base quantizer). λ = 0
removes only exact zeros (full precision), λ = 1 is the quantizer's own kernel, and λ = 2·qmax
removes everything. Each λ is one remove-kernel evaluation; its kernel proportion is measured in
that pass, elements-weighted over all covered Linear inputs.

Search: from λ = 1, double (or halve) until the perplexity leaves (or enters) the tolerance band
``ppl ≤ (1 + tolerance)·ppl_fp``, which brackets the crossing; then bisect the bracket in log λ.
Nothing assumes the curve is monotone: the reported crossing is the bracket that was observed, and
any point that contradicts monotonicity is reported too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
from torch import nn

from kernelscope.data import TextSource, Windows
from kernelscope.errors import KernelscopeError
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant import DEFAULT_ALPHA, QuantizerConfig
from kernelscope.quant.modes import Mode
from kernelscope.quant.transforms import IDENTITY, NONE, TransformSpec
from kernelscope.runs.common import (
    StageProgress,
    TableResult,
    resolve_layers,
    run_context,
    stage_callback,
    unpack,
)
from kernelscope.runs.evaluate import (
    calibrate_target,
    calibration_facts,
    protocol_text,
    run_scheme,
    transforms_facts,
    with_comparisons,
)
from kernelscope.runs.profiling import measured_kernels
from kernelscope.runs.schemes import Scheme
from kernelscope.runs.transforming import ModelTransform, TransformBinder, identity_transform
from kernelscope.stats.uncertainty import METHOD, crossing_interval, within_probabilities

MIN_WINDOWS = 2
LAMBDA_MIN = 2.0**-12
FAMILY_DEFINITION = "kernel K_λ = {|x| <= λ·B}, B the family's zero bound; λ = 1 is its own kernel"
TARGET_DEFINITION = ("kernel K_λ = {|x / s| <= λ·τ}, x / s as the target's library computes it and τ its "
                     "element's zero threshold; λ = 1 is the kernel the library rounds to zero")


@dataclass(frozen=True)
class Family:
    """The kernels a search scales: a quantizer of kernelscope's formats (its zero bound ``B``) or a
    deployment target (``scheme``: its library's quotient against its element's zero threshold)."""

    config: QuantizerConfig | None = None
    scheme: Scheme | None = None

    @property
    def label(self) -> str:
        return self.scheme.name if self.scheme else self.config.label

    @property
    def own(self) -> tuple:
        """How a measured kernel of this family is named: (quantizer, bits, alpha)."""
        if self.scheme:
            return self.scheme.name, self.scheme.target.input_activations.num_bits, None
        return self.config.quantizer, self.config.bits, self.config.alpha

    @property
    def saturation_scale(self) -> float:
        return (self.scheme.target.input_activations if self.scheme else self.config).saturation_scale

    def describe(self) -> dict[str, Any]:
        if self.scheme is None:
            return {**self.config.as_dict(), "label": self.label, "definition": FAMILY_DEFINITION}
        args = self.scheme.target.input_activations
        return {"quantizer": self.label, "bits": args.num_bits, "alpha": None, "format": args.element,
                "block_size": args.group_size, "label": self.label, "arithmetic": self.scheme.target.checked,
                "definition": TARGET_DEFINITION}

    def at(self, lam: float, weight_bits: int | None, group_size: int | None) -> Scheme:
        """The scheme that removes this family's kernel at ``lam``."""
        name = f"remove-kernel λ={lam:g}"
        if self.scheme:
            return Scheme(name, Mode.REMOVE_KERNEL, target=self.scheme.target, kernel_scale=lam)
        return Scheme(name, Mode.REMOVE_KERNEL, self.config, weight_bits, group_size, kernel_scale=lam)

class ThresholdResult(TableResult):
    """The remove-kernel curve (``table``: one row per evaluated λ and transform, by kernel
    proportion within each transform) and the summary (one search per transform)."""

    TABLE = "threshold"

    @property
    def curve(self) -> pl.DataFrame:
        return self.table


def bracket_crossing(within: Callable[[float], bool], lam_max: float, steps: int,
                     lam_min: float = LAMBDA_MIN) -> tuple[float | None, float | None]:
    """Bracket the λ where ``within(λ)`` turns False, then bisect it ``steps`` times in log λ.

    Starts at λ = 1; doubles while within (up to ``lam_max``) or halves while not (down to
    ``lam_min``). Returns ``(lo, hi)``: the largest λ seen within and the smallest beyond that
    bracket the crossing; ``hi`` is None when the curve never left the band up to ``lam_max``, ``lo``
    None when it was already out at ``lam_min``. No monotonicity is assumed: each answer is an
    observation, and the bracket is the one observed.
    """
    lo: float | None = None
    hi: float | None = None
    lam = min(1.0, lam_max)
    if within(lam):
        lo = lam
        while lam < lam_max:
            lam = min(2.0 * lam, lam_max)
            if not within(lam):
                hi = lam
                break
            lo = lam
    else:
        hi = lam
        while lam > lam_min:
            lam = max(lam / 2.0, lam_min)
            if within(lam):
                lo = lam
                break
            hi = lam
    if lo is not None and hi is not None:
        for _ in range(steps):
            mid = math.sqrt(lo * hi)
            if within(mid):
                lo = mid
            else:
                hi = mid
    return lo, hi


def _crossing_uncertainty(ordered: list[dict], fp: dict, tolerance: float, lo_row: dict | None,
                          hi_row: dict | None) -> dict | None:
    """Per point, how often it is within tolerance over resampled windows (``within_probability``,
    set on the rows); for the whole curve, the interval of the threshold and how often the observed
    bracket holds (None with one window, which a search never has)."""
    probabilities = within_probabilities([r["window_nll"] for r in ordered], fp["window_nll"], tolerance)
    for row, p in zip(ordered, probabilities or [None] * len(ordered), strict=True):
        row["within_probability"] = p
    rows = [id(r) for r in ordered]
    bracket = (rows.index(id(lo_row)) if lo_row else None, rows.index(id(hi_row)) if hi_row else None)
    found = crossing_interval([r["window_nll"] for r in ordered], [r["kernel_fraction"] for r in ordered],
                              fp["window_nll"], tolerance, bracket=bracket)
    return None if found is None else found.as_dict()


def _judged(row: dict, family: Family, label: str, lo: dict | None, hi: dict | None,
            tolerance: float, uncertainty: dict | None) -> str:
    """The verdict on one measured kernel: a threshold judges only a kernel of its own family (the
    quantizer whose zero bound it scales), in its own basis; any other kernel differs in kind."""
    if (row["quantizer"], row["bits"], row["alpha"]) != family.own:
        return (f"{row['config']}{label} kernel {100 * row['kernel_fraction']:.2f}%: not judged, this "
                f"threshold is the {family.label} family's (search --family for its own)")
    verdict = _verdict(row["config"] + label, row["kernel_fraction"], lo, hi, tolerance)
    if uncertainty and uncertainty.get("kernel_fraction_ci_low") is not None:
        verdict += (f" (the threshold's 95% interval over resampled windows: "
                    f"{100 * uncertainty['kernel_fraction_ci_low']:.2f}%.."
                    f"{100 * uncertainty['kernel_fraction_ci_high']:.2f}%)")
    return verdict


def _verdict(label: str, fraction: float, lo: dict | None, hi: dict | None, tolerance: float) -> str:
    pct = f"{100 * fraction:.2f}%"
    band = f"{100 * tolerance:g}%"
    if hi is None:
        top = 100 * lo["kernel_fraction"] if lo else 0.0
        return (f"{label} kernel {pct}: the remove-kernel curve never left the {band} band up to a "
                f"{top:.1f}% kernel, so the kernel alone is not expected to cost perplexity")
    lo_pct = 100 * lo["kernel_fraction"] if lo else 0.0
    hi_pct = 100 * hi["kernel_fraction"]
    if fraction <= lo_pct / 100:
        return (f"{label} kernel {pct} is below the {lo_pct:.2f}% threshold: removing it alone "
                f"should cost less than {band} perplexity")
    if fraction >= hi_pct / 100:
        return f"{label} kernel {pct} is above the {lo_pct:.2f}% threshold: expect loss from the kernel alone"
    return (f"{label} kernel {pct} lies inside the bracket {lo_pct:.2f}%..{hi_pct:.2f}% where the "
            f"crossing was located: undetermined at this resolution (add --steps)")


def threshold_search(
    model: nn.Module | LoadedModel,
    windows: Windows,
    *,
    text: TextSource | None = None,
    family: QuantizerConfig | Scheme | None = None,
    tolerance: float = 0.01,
    steps: int = 6,
    alpha: float = DEFAULT_ALPHA,
    weight_bits: int | None = None,
    group_size: int | None = None,
    layers: str | Sequence[LinearLayer] | None = None,
    transforms: Sequence[TransformSpec] = (IDENTITY,),
    calibration: Windows | None = None,
    calibration_text: TextSource | None = None,
    batch_size: int = 1,
    progress: StageProgress | None = None,
) -> ThresholdResult:
    """Locate the largest kernel proportion whose remove-kernel perplexity stays within tolerance.

    ``family``: the quantizer whose zero bound is scaled (default per-token INT8), or a deployment
    target's scheme (its library's quotient against its element's zero threshold; static scales
    calibrated on ``calibration``). The model's per-token and CrossQuant (``alpha``) kernels at INT8
    and INT4 are measured on the same windows and placed against the threshold. With several
    ``transforms`` the search runs in each one's basis, against the one full-precision perplexity."""
    _check_search(tolerance, steps, windows, transforms)
    family = _family(family, transforms)
    net, info, tokenizer = unpack(model)
    selected = resolve_layers(net, layers)
    binder = TransformBinder(net, selected, calibration, batch_size=batch_size)
    bound = [binder.bind(t) for t in transforms]
    scales, static = _target_scales(net, family, selected, calibration, batch_size)
    actual = measured_kernels(net, windows, _actual_configs(alpha), selected, bound, tokenizer=tokenizer,
                              batch_size=batch_size, progress=stage_callback(progress, "kernels"))
    fp = run_scheme(net, windows, Scheme("fp", Mode.FP, weight_bits=None), selected,
                    batch_size=batch_size, progress=stage_callback(progress, "fp"))
    target = fp["perplexity"] * (1 + tolerance)
    searches = _searches(net, windows, selected, family, bound, actual, fp, target, tolerance=tolerance,
                         steps=steps, weight_bits=weight_bits, group_size=group_size, batch_size=batch_size,
                         progress=progress, scales=scales)
    curve = pl.DataFrame([row for search in searches for row in search.pop("points")],
                         infer_schema_length=None)
    summary = {
        **run_context(info, text, windows, "threshold"),
        "protocol": protocol_text(windows),
        "family": family.describe(),
        "tolerance": tolerance,
        "fp_perplexity": fp["perplexity"],
        "fp_perplexity_ci": [fp["perplexity_ci_low"], fp["perplexity_ci_high"]],
        "fp_window_nll": fp["window_nll"],
        "target_perplexity": target,
        "uncertainty": METHOD,
        "transforms": transforms_facts(transforms),
        "calibration": calibration_facts(calibration, calibration_text, binder.calibrated or bool(static)),
        **({"static_scales": static} if static else {}),
        "searches": searches,
        "settings": {"steps": steps, "weight_bits": weight_bits, "group_size": group_size,
                     "alpha": alpha, "batch_size": batch_size},
    }
    return ThresholdResult(curve, summary)


def _actual_configs(alpha: float) -> list[QuantizerConfig]:
    """The quantizers whose kernels on the model are placed against the threshold: per-token and
    CrossQuant at ``alpha``, at INT8 and INT4."""
    return [QuantizerConfig("per_token", 8), QuantizerConfig("crossquant", 8, alpha),
            QuantizerConfig("per_token", 4), QuantizerConfig("crossquant", 4, alpha)]


def _check_search(tolerance: float, steps: int, windows: Windows,
                  transforms: Sequence[TransformSpec]) -> None:
    """Refuse a search that cannot be run: a tolerance that is not a positive number, negative steps,
    too few windows for an interval, or no transform."""
    if not tolerance > 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a positive number, got {tolerance}")
    if steps < 0:
        raise ValueError(f"steps must be at least 0, got {steps}")
    if len(windows) < MIN_WINDOWS:
        raise ValueError(f"a threshold search needs at least {MIN_WINDOWS} windows, got {len(windows)}")
    if not transforms:
        raise ValueError("threshold_search needs at least one transform (IDENTITY for none)")


def _searches(net: nn.Module, windows: Windows, selected: list[LinearLayer], family: Family,
              bound: list[ModelTransform], actual: dict[str, list[dict]], fp: dict, target: float, *,
              tolerance: float, steps: int, weight_bits: int | None, group_size: int | None,
              batch_size: int, progress: StageProgress | None, scales: dict | None = None
              ) -> list[dict[str, Any]]:
    """One :func:`_search` per transform, in order; with several, each stage names its transform."""
    several = len(bound) > 1
    searches = []
    for t in bound:
        def stage(name: str, t: ModelTransform = t) -> Callable[[int, int], None] | None:
            return stage_callback(progress, f"{name}, {t.label}" if several else name)

        searches.append(_search(net, windows, selected, family, t, actual[t.label], fp, target, tolerance,
                                steps, weight_bits, group_size, batch_size, stage, scales))
    return searches


def _search(net: nn.Module, windows: Windows, selected: list[LinearLayer], family: Family,
            transform: ModelTransform, actual: list[dict], fp: dict, target: float, tolerance: float,
            steps: int, weight_bits: int | None, group_size: int | None, batch_size: int,
            stage: Callable[[str], Any], scales: dict | None = None) -> dict[str, Any]:
    """One bracketing search along λ with the kernel removed in ``transform``'s basis, each point with
    its interval and its paired difference from ``fp``, and the uncertainty of the crossing."""
    points: dict[float, dict[str, Any]] = {}

    def at(lam: float) -> dict[str, Any]:
        if lam not in points:
            row = run_scheme(net, windows, family.at(lam, weight_bits, group_size), selected,
                             transform=transform, batch_size=batch_size, progress=stage(f"λ={lam:.4g}"),
                             calibration=scales)
            row["lambda"] = lam
            row["within_tolerance"] = row["perplexity"] <= target
            points[lam] = row
        return points[lam]

    lo, hi = bracket_crossing(lambda lam: at(lam)["within_tolerance"], family.saturation_scale, steps)
    ordered = sorted(points.values(), key=lambda r: (r["kernel_fraction"], r["lambda"]))
    lo_row = points.get(lo) if lo is not None else None
    hi_row = points.get(hi) if hi is not None else None
    uncertainty = _crossing_uncertainty(ordered, fp, tolerance, lo_row, hi_row)
    ordered = with_comparisons(ordered, fp)
    contradictions = [
        r["lambda"] for r in points.values()
        if (lo is not None and r["lambda"] < lo and not r["within_tolerance"])
        or (hi is not None and r["lambda"] > hi and r["within_tolerance"])
    ]
    label = "" if transform.is_identity else f" ({transform.label})"
    actual = actual + _own_kernel(family, points)
    verdicts = [_judged(r, family, label, lo_row, hi_row, tolerance, uncertainty) for r in actual]
    if hi is None:
        status = "never crossed"
    elif lo is None:
        status = f"crossed below the smallest λ tried ({LAMBDA_MIN:g})"
    else:
        status = "crossing bracketed"
    return {
        **transform.describe(),
        "status": status,
        "threshold_kernel_fraction": lo_row["kernel_fraction"] if lo_row else None,
        "crossing_uncertainty": uncertainty,
        "bracket": {
            "within": {k: lo_row[k] for k in ("lambda", "kernel_fraction", "perplexity")} if lo_row else None,
            "beyond": {k: hi_row[k] for k in ("lambda", "kernel_fraction", "perplexity")} if hi_row else None,
        },
        "non_monotone_lambdas": sorted(contradictions),
        "actual_kernels": actual,
        "verdicts": verdicts,
        "evaluations": len(points),
        "curve": [{k: r[k] for k in ("lambda", "kernel_fraction", "perplexity", "perplexity_ci_low",
                                     "perplexity_ci_high", "within_tolerance", "within_probability")}
                  for r in ordered],
        "points": ordered,
    }


def _family(family: QuantizerConfig | Scheme | None, transforms: Sequence[TransformSpec]) -> Family:
    """The family searched (per-token INT8 by default); a target's only in the model's own basis."""
    if isinstance(family, Scheme):
        why = family.kernel_refusal(transforms, "search")
        if why is not None:
            raise KernelscopeError(why)
        return Family(scheme=family)
    return Family(config=family or QuantizerConfig("per_token", 8))


def _target_scales(net: nn.Module, family: Family, selected: list[LinearLayer], calibration: Windows | None,
                   batch_size: int) -> tuple[dict, dict]:
    """A target family's static scales, calibrated as ``eval`` calibrates them, and their record."""
    if family.scheme is None:
        return {}, {}
    return calibrate_target(net, family.scheme, selected, identity_transform(selected), calibration,
                            batch_size=batch_size)


def _own_kernel(family: Family, points: dict[float, dict[str, Any]]) -> list[dict[str, Any]]:
    """A target family's own kernel (λ = 1, measured in the search's pass), to be judged beside the
    model's per-token and CrossQuant kernels; nothing for a format family, whose kernels those are."""
    if family.scheme is None or 1.0 not in points:
        return []
    quantizer, bits, alpha = family.own
    own = points[1.0]
    return [{"transform": NONE, "config": family.label, "quantizer": quantizer, "bits": bits, "alpha": alpha,
             **{k: own[k] for k in ("kernel_elements", "elements", "kernel_fraction")}}]
