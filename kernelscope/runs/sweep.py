"""``alpha_sweep``: kernel proportion and W8A8 perplexity for each CrossQuant α (the paper's
Figure 8 / Table 4). α = 1 is per-token."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import polars as pl
from torch import nn

from kernelscope.data import TextSource, Windows
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant import QuantizerConfig, check_alpha
from kernelscope.quant.transforms import IDENTITY, TransformSpec
from kernelscope.runs.common import (
    StageProgress,
    TableResult,
    resolve_layers,
    run_context,
    stage_callback,
    text_facts,
    unpack,
)
from kernelscope.runs.evaluate import protocol_text, run_scheme, transforms_facts
from kernelscope.runs.schemes import Scheme
from kernelscope.runs.transforming import ModelTransform, TransformBinder, measured_kernels


class SweepResult(TableResult):
    """One row per transform and α plus the fp reference (``table``), and ``sweep.json``."""

    TABLE = "sweep"
    SUMMARY = "sweep.json"


def alpha_sweep(
    model: nn.Module | LoadedModel,
    windows: Windows,
    alphas: Sequence[float],
    *,
    text: TextSource | None = None,
    bits: int = 8,
    weight_bits: int = 8,
    group_size: int | None = None,
    layers: str | Sequence[LinearLayer] | None = None,
    transforms: Sequence[TransformSpec] = (IDENTITY,),
    calibration: Windows | None = None,
    calibration_text: TextSource | None = None,
    batch_size: int = 1,
    progress: StageProgress | None = None,
) -> SweepResult:
    """For each transform and α: the CrossQuant kernel of the full-precision activations in the
    transform's basis (``kernel_fraction``), and the perplexity with weights and activations
    fake-quantized (W{weight_bits}A{bits}) in that basis, with the kernel measured inside that
    quantized pass (``quantized_kernel_fraction``). One full-precision row (no transform) is the
    reference; calibrated transforms need ``calibration`` windows."""
    alphas = [check_alpha(a) for a in dict.fromkeys(alphas)]
    if not alphas:
        raise ValueError("alpha_sweep needs at least one α")
    if not transforms:
        raise ValueError("alpha_sweep needs at least one transform (IDENTITY for none)")
    net, info, tokenizer = unpack(model)
    selected = resolve_layers(net, layers)
    binder = TransformBinder(net, selected, calibration, batch_size=batch_size)
    bound = [binder.bind(t) for t in transforms]
    several = len(bound) > 1

    def stage(name: str, t: ModelTransform) -> Callable[[int, int], None] | None:
        return stage_callback(progress, f"{name}, {t.label}" if several else name)

    configs = [QuantizerConfig("crossquant", bits, a) for a in alphas]
    kernels = {t.label: measured_kernels(net, windows, configs, selected, t, tokenizer=tokenizer,
                                         batch_size=batch_size, progress=stage("kernels", t)) for t in bound}
    fp = run_scheme(net, windows, Scheme("fp", "fp"), selected, batch_size=batch_size,
                    progress=stage_callback(progress, "fp"))
    rows = [{"alpha": None, "scheme": "fp", "transform": fp["transform"], "kernel_fraction": None,
             "perplexity": fp["perplexity"], "quantized_kernel_fraction": None, "tokens": fp["tokens"],
             "seconds": fp["seconds"]}]
    group = f"-g{group_size}" if group_size else ""
    name = f"w{weight_bits}a{bits}{group}-crossquant"
    for t in bound:
        for a, kernel in zip(alphas, kernels[t.label], strict=True):
            scheme = Scheme(name, "fake_quant", QuantizerConfig("crossquant", bits, a), weight_bits, group_size)
            row = run_scheme(net, windows, scheme, selected, transform=t, batch_size=batch_size,
                             progress=stage(f"α={a:g}", t))
            rows.append({"alpha": a, "scheme": name, "transform": t.label,
                         "kernel_fraction": kernel["kernel_fraction"], "perplexity": row["perplexity"],
                         "quantized_kernel_fraction": row["kernel_fraction"], "tokens": row["tokens"],
                         "seconds": row["seconds"]})
    table = pl.DataFrame(rows, schema_overrides={"alpha": pl.Float64}, infer_schema_length=None)
    summary = {
        **run_context(info, text, windows, "sweep"),
        "protocol": protocol_text(windows),
        "bits": bits, "weight_bits": weight_bits, "group_size": group_size,
        "fp_perplexity": fp["perplexity"],
        "transforms": transforms_facts(transforms),
        "calibration": ({"text": text_facts(calibration_text), "windows": calibration.as_dict()}
                        if calibration is not None and binder.calibrated else None),
        "results": rows,
        "note": "alpha = 1 is per-token; kernel_fraction is measured on full-precision activations "
                "(in the transform's basis)",
    }
    return SweepResult(table, summary)
