"""``sweep``: kernel proportion and perplexity for each of several quantizers: CrossQuant at several
α (the paper's Figure 8 / Table 4; α = 1 is per-token), or any formats of the registry side by side."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
from torch import nn

from kernelscope.data import TextSource, Windows
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant import QuantizerConfig, check_alpha
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
from kernelscope.runs.evaluate import calibration_facts, compare, protocol_text, run_scheme, transforms_facts
from kernelscope.runs.profiling import measured_kernels
from kernelscope.runs.schemes import Scheme, scheme_of
from kernelscope.runs.transforming import ModelTransform, TransformBinder
from kernelscope.stats.uncertainty import METHOD

_MEASURED = ("perplexity", "perplexity_ci_low", "perplexity_ci_high", "nll", "window_nll", "tokens",
             "seconds")


def _measured(row: dict) -> dict:
    """What a sweep row keeps of an evaluation: the perplexity, its interval and its windows."""
    return {k: row[k] for k in _MEASURED}


class SweepResult(TableResult):
    """One row per transform and quantizer plus the fp reference (``table``), and the JSON summary."""

    TABLE = "sweep"


def sweep(
    model: nn.Module | LoadedModel,
    windows: Windows,
    configs: Sequence[QuantizerConfig],
    *,
    text: TextSource | None = None,
    weight_bits: int = 8,
    group_size: int | None = None,
    layers: str | Sequence[LinearLayer] | None = None,
    transforms: Sequence[TransformSpec] = (IDENTITY,),
    calibration: Windows | None = None,
    calibration_text: TextSource | None = None,
    batch_size: int = 1,
    progress: StageProgress | None = None,
) -> SweepResult:
    """For each transform and quantizer configuration: its kernel on the full-precision activations
    in the transform's basis (``fp_kernel_fraction``), and the perplexity under its scheme
    (:func:`~kernelscope.runs.schemes.scheme_of`: an INT quantizer with weights at ``weight_bits``,
    per output channel or per ``group_size`` inputs; a float format with weights in that format),
    with the kernel measured inside that quantized pass (``kernel_fraction``, as in every run kind: the
    kernel of the activations the row's own pass quantizes) and the
    paired difference from fp. One full-precision row (no transform) is the reference; calibrated
    transforms need ``calibration`` windows."""
    configs = list(dict.fromkeys(configs))
    if not configs:
        raise ValueError("sweep needs at least one quantizer configuration")
    if not transforms:
        raise ValueError("sweep needs at least one transform (IDENTITY for none)")
    net, info, tokenizer = unpack(model)
    selected = resolve_layers(net, layers)
    binder = TransformBinder(net, selected, calibration, batch_size=batch_size)
    bound = [binder.bind(t) for t in transforms]
    kernels = measured_kernels(net, windows, configs, selected, bound, tokenizer=tokenizer,
                               batch_size=batch_size, progress=stage_callback(progress, "kernels"))
    fp = run_scheme(net, windows, Scheme("fp", Mode.FP), selected, batch_size=batch_size,
                    progress=stage_callback(progress, "fp"))
    rows = [{"quantizer": None, "alpha": None, "scheme": "fp", "transform": fp["transform"],
             "fp_kernel_fraction": None, **_measured(fp), "kernel_fraction": None}]
    rows += _quantized_rows(net, windows, configs, selected, bound, kernels, fp, weight_bits=weight_bits,
                            group_size=group_size, batch_size=batch_size, progress=progress)
    rows[0] |= dict.fromkeys(k for k in rows[-1] if k not in rows[0])
    table = pl.DataFrame(rows, schema_overrides={"alpha": pl.Float64, "quantizer": pl.String},
                         infer_schema_length=None)
    summary = {
        **run_context(info, text, windows, "sweep"),
        "protocol": protocol_text(windows),
        "quantizers": [c.as_dict() | {"label": c.label} for c in configs],
        "weight_bits": weight_bits, "group_size": group_size,
        "fp_perplexity": fp["perplexity"],
        "uncertainty": METHOD,
        "transforms": transforms_facts(transforms),
        "calibration": calibration_facts(calibration, calibration_text, binder.calibrated),
        "results": rows,
        "note": "alpha = 1 is per-token; fp_kernel_fraction is measured on full-precision activations, "
                "kernel_fraction inside the quantized pass (both in the transform's basis)",
    }
    return SweepResult(table, summary)


def _quantized_rows(net: nn.Module, windows: Windows, configs: list[QuantizerConfig],
                    selected: list[LinearLayer], bound: list[ModelTransform], kernels: dict[str, list[dict]],
                    fp: dict, *, weight_bits: int, group_size: int | None, batch_size: int,
                    progress: StageProgress | None) -> list[dict]:
    """The row of each configuration's scheme under each transform, in that order: its perplexity,
    the kernel inside its own pass and on the full-precision activations, and its difference from
    ``fp``."""
    several = len(bound) > 1
    rows = []
    for t in bound:
        for cfg, kernel in zip(configs, kernels[t.label], strict=True):
            scheme = scheme_of(cfg, weight_bits, group_size)
            name = cfg.label if cfg.alpha is None else f"α={cfg.alpha:g}"
            row = run_scheme(net, windows, scheme, selected, transform=t, batch_size=batch_size,
                             progress=stage_callback(progress, f"{name}, {t.label}" if several else name))
            rows.append({"quantizer": cfg.label, "alpha": cfg.alpha, "scheme": scheme.name,
                         "transform": t.label, "fp_kernel_fraction": kernel["kernel_fraction"],
                         **_measured(row),
                         "kernel_fraction": row["kernel_fraction"]} | compare(row, fp))
    return rows


def alpha_sweep(model: nn.Module | LoadedModel, windows: Windows, alphas: Sequence[float], *, bits: int = 8,
                **options) -> SweepResult:
    """:func:`sweep` over CrossQuant at each α at ``bits``-bit activations (α = 1 is per-token)."""
    alphas = [check_alpha(a) for a in dict.fromkeys(alphas)]
    if not alphas:
        raise ValueError("alpha_sweep needs at least one α")
    return sweep(model, windows, [QuantizerConfig("crossquant", bits, a) for a in alphas], **options)
