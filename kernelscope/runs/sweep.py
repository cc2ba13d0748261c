"""``alpha_sweep``: kernel proportion and W8A8 perplexity for each CrossQuant α (the paper's
Figure 8 / Table 4). α = 1 is per-token."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
from torch import nn

from kernelscope.data import TextSource, Windows
from kernelscope.models import LinearLayer, LoadedModel
from kernelscope.quant import QuantizerConfig, check_alpha
from kernelscope.runs.common import (
    StageProgress,
    TableResult,
    resolve_layers,
    run_context,
    stage_callback,
    unpack,
)
from kernelscope.runs.evaluate import compare, protocol_text, run_scheme
from kernelscope.runs.profiling import profile
from kernelscope.runs.schemes import Scheme
from kernelscope.stats.uncertainty import METHOD

_MEASURED = ("perplexity", "perplexity_ci_low", "perplexity_ci_high", "nll", "window_nll", "tokens", "seconds")


def _measured(row: dict) -> dict:
    """What a sweep row keeps of an evaluation: the perplexity, its interval and its windows."""
    return {k: row[k] for k in _MEASURED}


class SweepResult(TableResult):
    """One row per α plus the fp reference (``table``), and ``sweep.json``."""

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
    batch_size: int = 1,
    progress: StageProgress | None = None,
) -> SweepResult:
    """For each α: the CrossQuant kernel of the full-precision activations (``kernel_fraction``),
    and the perplexity with weights and activations fake-quantized (W{weight_bits}A{bits}), with the
    kernel measured inside that quantized pass (``quantized_kernel_fraction``)."""
    alphas = [check_alpha(a) for a in dict.fromkeys(alphas)]
    if not alphas:
        raise ValueError("alpha_sweep needs at least one α")
    net, info, tokenizer = unpack(model)
    selected = resolve_layers(net, layers)
    stage = lambda name: stage_callback(progress, name)  # noqa: E731

    configs = [QuantizerConfig("crossquant", bits, a) for a in alphas]
    kernels = profile(net, windows, configs, tokenizer=tokenizer, layers=selected,
                      batch_size=batch_size, progress=stage("kernels")).model_level
    fp = run_scheme(net, windows, Scheme("fp", "fp"), selected, batch_size=batch_size, progress=stage("fp"))
    rows = [{"alpha": None, "scheme": "fp", "kernel_fraction": None, **_measured(fp),
             "quantized_kernel_fraction": None}]
    group = f"-g{group_size}" if group_size else ""
    for a, kernel in zip(alphas, kernels["kernel_fraction"].to_list(), strict=True):
        name = f"w{weight_bits}a{bits}{group}-crossquant"
        scheme = Scheme(name, "fake_quant", QuantizerConfig("crossquant", bits, a), weight_bits, group_size)
        row = run_scheme(net, windows, scheme, selected, batch_size=batch_size, progress=stage(f"α={a:g}"))
        rows.append({"alpha": a, "scheme": name, "kernel_fraction": kernel, **_measured(row),
                     "quantized_kernel_fraction": row["kernel_fraction"]} | compare(row, fp))
    rows[0] |= dict.fromkeys(k for k in rows[-1] if k not in rows[0])
    table = pl.DataFrame(rows, schema_overrides={"alpha": pl.Float64}, infer_schema_length=None)
    summary = {
        **run_context(info, text, windows, "sweep"),
        "protocol": protocol_text(windows),
        "bits": bits, "weight_bits": weight_bits, "group_size": group_size,
        "fp_perplexity": fp["perplexity"],
        "uncertainty": METHOD,
        "results": rows,
        "note": "alpha = 1 is per-token; kernel_fraction is measured on full-precision activations",
    }
    return SweepResult(table, summary)
